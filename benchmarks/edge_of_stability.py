"""Reproduce the edge of stability of GD and SAM (Long & Bartlett 2023, arXiv 2309.12488) on CPU.

Full-batch gradient descent and full-batch SAM (no momentum, as in the paper) train the same small MLP,
from the same initialization, on scikit-learn's digits (shipped with the package, no download) with the
squared loss. Every step logs ``2/eta`` and the SAM-edge from the gradient norm the step computes; every
``--every`` steps power iteration measures the top eigenvalue of the full-batch Hessian. GD's eigenvalue
should settle near ``2/eta``, SAM's near the SAM-edge, well below ``2/eta``.

Both optimizers run on the project's op layer (``sam_kernels.ops``): ``grad_norm``, ``perturb_`` and
``restore_sgd_step_`` with momentum 0.

    python -m benchmarks.edge_of_stability [--steps N] [--lr ETA] [--rho RHO] [--out DIR]

writes ``edge_of_stability.png`` and ``edge_of_stability.json`` under ``--out`` and prints the mean ratio
of the measured eigenvalue to each edge over the last part of training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from sam_kernels import diagnostics, ops

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def load_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images scaled to [0, 1] and one-hot targets; ``samples`` of them drawn with ``seed``."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.nn.functional.one_hot(torch.tensor(labels), 10).float()
    if samples < len(x):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]
        x, y = x[order], y[order]
    return x, y


def make_model(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))


def train(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, rho: float,
          steps: int, every: int, eig_iters: int, tol: float, backend: str = "auto") -> list[dict]:
    """Full-batch GD (``rho=0``) or SAM on the op layer; returns the monitor's records."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn() -> torch.Tensor:
        return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()

    monitor = diagnostics.SharpnessMonitor(params, lr=lr, rho=rho, loss_fn=loss_fn, every=every,
                                           max_iters=eig_iters, tol=tol, model=model)
    backups = [torch.empty_like(p) for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    report_every = max(every, (steps // 10) // max(every, 1) * every)
    started, measuring, products = time.perf_counter(), 0.0, 0
    for step in range(steps):
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        norm, _ = ops.grad_norm(params, backend=backend)
        clock = time.perf_counter()
        result = monitor.step(norm, loss=loss.detach())  # at the weights the norm belongs to
        measuring += time.perf_counter() - clock
        if rho > 0:
            with torch.no_grad():
                ops.perturb_(params, backups, norm, rho=rho, backend=backend)
            for p in params:
                p.grad = None
            loss_fn().backward()
            with torch.no_grad():
                ops.restore_sgd_step_(params, backups, buffers, lr=lr, momentum=0.0, backend=backend)
        else:
            # Plain GD: the weights are their own backup, so the fused restore-and-step is just the step.
            with torch.no_grad():
                ops.restore_sgd_step_(params, params, buffers, lr=lr, momentum=0.0, backend=backend)
        if result is not None:
            products += result.iterations
            if step % report_every == 0:
                print(f"  {name} step {step:5d}  loss {loss.item():.4f}  |g| {norm.item():.4f}  "
                      f"lambda {result.eigenvalue:7.3f}  ({result.iterations:3d} HVPs"
                      f"{'' if result.converged else ', not converged'})", flush=True)
    total = time.perf_counter() - started
    print(f"  {name}: {total:.1f} s, of which {measuring:.1f} s in {products} Hessian-vector products",
          flush=True)
    return monitor.records


def plot(runs: dict[str, list[dict]], ratios: dict[str, dict], path: Path, lr: float, rho: float,
         last: float) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    diagnostics.plot_sharpness(runs["gd"], ax=axes[0], title=f"GD, $\\eta$={lr}")
    diagnostics.plot_sharpness(runs["sam"], ax=axes[1], title=f"SAM, $\\eta$={lr}, $\\rho$={rho}")
    notes = {"gd": f"$\\lambda\\,/\\,(2/\\eta)$ = {ratios['gd']['gd']:.3f}",
             "sam": f"$\\lambda$ / SAM-edge = {ratios['sam']['sam']:.3f}\n"
                    f"$\\lambda\\,/\\,(2/\\eta)$ = {ratios['sam']['gd']:.3f}"}
    for ax, name in zip(axes, ("gd", "sam"), strict=True):
        ax.text(0.98, 0.04, f"mean over the last {last:.0%}:\n{notes[name]}", transform=ax.transAxes,
                ha="right", va="bottom", fontsize="small",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    top = max(r["gd_edge"] for r in runs["gd"])
    eig = [r["eigenvalue"] for run in runs.values() for r in run if r["eigenvalue"] is not None]
    axes[0].set_ylim(0, 1.25 * max([top, *[e for e in eig if math.isfinite(e)]]))
    figure.suptitle("Top Hessian eigenvalue (full batch) against the edges of stability, digits MLP")
    figure.savefig(path, dpi=130)


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps per optimizer")
    parser.add_argument("--lr", type=float, default=0.1, help="step size eta (both optimizers)")
    parser.add_argument("--rho", type=float, default=0.02, help="SAM radius")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the MLP")
    parser.add_argument("--samples", type=int, default=1797, help="training examples (full batch)")
    parser.add_argument("--every", type=int, default=20, help="measure the eigenvalue every k steps")
    parser.add_argument("--eig-iters", type=int, default=100, help="most power iterations per measurement")
    parser.add_argument("--tol", type=float, default=1e-2, help="power iteration relative residual tolerance")
    parser.add_argument("--last", type=float, default=0.25, help="fraction of training for the ratios")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                        help="sam_kernels backend of the ops (auto: the torch reference on the CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the matrices are tiny: one thread is about as fast)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    started = time.perf_counter()
    x, y = load_data(args.samples, args.seed)
    runs = {}
    for name, rho in (("gd", 0.0), ("sam", args.rho)):
        print(f"{name.upper()}: eta={args.lr} rho={rho} steps={args.steps}", flush=True)
        runs[name] = train(name, make_model(args.width, args.seed), x, y, lr=args.lr, rho=rho,
                           steps=args.steps, every=args.every, eig_iters=args.eig_iters, tol=args.tol,
                           backend=args.backend)
    ratios = {name: diagnostics.edge_ratios(records, last_fraction=args.last)
              for name, records in runs.items()}
    elapsed = time.perf_counter() - started

    figure_path = args.out / "edge_of_stability.png"
    record_path = args.out / "edge_of_stability.json"
    plot(runs, ratios, figure_path, args.lr, args.rho, args.last)
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "ratios": ratios, "seconds": elapsed, "torch": torch.__version__}
    with open(record_path, "w", encoding="utf-8") as handle:
        json.dump(_finite({"summary": summary, "runs": runs}), handle, indent=1, allow_nan=False)

    tail = f"last {args.last:.0%} of training"
    print(f"\nMean measured eigenvalue / edge over the {tail}:")
    print(f"  GD : lambda / (2/eta)    = {ratios['gd']['gd']:.3f}  "
          f"({ratios['gd']['measurements']:.0f} measurements)")
    print(f"  SAM: lambda / SAM-edge   = {ratios['sam']['sam']:.3f}  "
          f"({ratios['sam']['measurements']:.0f} measurements)")
    print(f"  SAM: lambda / (2/eta)    = {ratios['sam']['gd']:.3f}")
    for name, records in runs.items():
        measured = [r for r in records if r["eigenvalue"] is not None]
        missed = sum(not r["eig_converged"] for r in measured)
        print(f"  {name.upper()}: {len(measured) - missed}/{len(measured)} power iterations converged "
              f"(relative residual <= {args.tol:g})")
    print(f"figure: {figure_path}\nrecord: {record_path}\ntime: {elapsed:.1f} s")
    return summary


if __name__ == "__main__":
    main()
