"""Generalization against cost: test accuracy and measured passes per step of SGD, SAM and its variants.

Set-up. scikit-learn's digits (1797 8x8 images, shipped with the package, no download), one fixed split
(seed 0) into 1297 training and 500 test images, features standardized with the training mean and std.
Per seed, 40% of the training labels are replaced by a label drawn uniformly from the other nine classes
(symmetric noise); the test labels stay clean. Within a seed every optimizer starts from the same weights
and sees the same noisy labels and the same minibatch order; the optimizers of a seed run interleaved,
one epoch each in turn, so that machine noise hits them alike. Two tiny models: ``mlp`` (64-128-128-10,
ReLU) and ``cnn`` (two 3x3 conv layers of 16 and 32 channels with ReLU, 2x2 max-pool, linear head
512-10). Training: minibatch 64 (20 steps per epoch, the partial batch dropped), every optimizer over
SGD with momentum 0.9 and weight decay 5e-4, lr 0.05 decayed to 0 by a cosine per step, identical for
all. Test accuracy is read after the last epoch (no early stopping): with noisy labels the differences
show how much of the noise each optimizer fits.

Optimizers and their compute model per step, in forward (F) and backward (B) passes of the model on the
minibatch:

    SGD          1 F, 1 B
    SAM          2 F, 2 B                  rho 0.05 (gradient at w, then at w + e)
    ASAM         2 F, 2 B                  adaptive, rho 0.5 (about 10x SAM's)
    SSAM         2 F, 2 B                  e = rho g unnormalized, descent gradient rescaled to ||g||;
                                           rho 0.05 (see below)
    ESAM         3 F, 2 B                  beta 0.6, gamma 0.5, rho 0.05: full batch at w (forward,
                                           SWP-pruned backward), a no-grad full batch at w + e, the
                                           selected half at w + e (forward, backward); in batches of
                                           work 2.5 forward, 1.5 backward
    IntervalSAM  1 + 1/k F and B           Interval(k=5), rho 0.1 (scaled up with k)
    RandomSAM    1 + p on average          Randomized(p=0.5), rho 0.05
    LateSAM      1 + 1/2                   LatePhase(start=0.5): SAM for the last half, rho 0.05
    AE-SAM       1 + (share of SAM steps)  AESAM (decay 0.9, lambda 1 -1, lambda 2 1), rho 0.05;
                                           the share depends on the gradient norms
    LookSAM      1 + 1/k                   k 5, alpha 0.7, rho 0.05 (plain steps reuse g_v)
    MSAM         1 F, 1 B                  MomentumSAM, rho 0.3 (gradient at w - rho v / ||v||)

The table shows the passes as measured with module hooks on the model (a forward pre-hook counts
forwards, a forward hook that hooks the output's gradient counts backwards; evaluation is not counted),
never the model above. SSAM's rho: its ascent ``rho * g`` is ``rho * ||g||`` long; the minibatch
gradient norm stays between about 0.4 and 1.6 over training here (both models, measured along a SAM run),
so rho 0.05 gives perturbations about as long as SAM's. A short sweep (2 seeds, 30 epochs) over
{0.01, 0.02, 0.05, 0.1} found accuracy rising with rho on both models; 0.05 is kept for a like-for-like
radius rather than tuned on the test set. Likewise MSAM keeps its official rho 0.3 (1.0 gave a higher
test accuracy in the same short check). "gain kept" is (acc - acc_SGD) / (acc_SAM - acc_SGD)
of the seed means (given where SAM beats SGD); for ASAM and SSAM it reads as their gain relative to SAM's.
"noise fit" is the training accuracy on the flipped labels: how much of the noise a run memorized.

    python -m benchmarks.generalization [--seeds 3] [--epochs E] [--quick] [--threads 1]

prints a markdown table and writes benchmarks/results/generalization.json and docs/generalization.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sam_kernels import backends
from sam_kernels.optim import (
    AESAM,
    ESAM,
    SAM,
    Interval,
    LatePhase,
    LookSAM,
    MomentumSAM,
    Randomized,
    sample_losses_closure,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "generalization.json"
DEFAULT_FIGURE = ROOT / "docs" / "generalization.png"

TRAIN_SIZE, TEST_SIZE, SPLIT_SEED = 1297, 500, 0
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 64, 0.05, 0.9, 5e-4
NOISE = 0.4
EPOCHS, QUICK_EPOCHS = 40, 2
K, P, LATE_START, ALPHA, BETA, GAMMA = 5, 0.5, 0.5, 0.7, 0.6, 0.5

#: Radius of each optimizer (None: SGD has none); ``--rho NAME=VALUE`` overrides one.
RHO: dict[str, float | None] = {
    "SGD": None, "SAM": 0.05, "ASAM": 0.5, "SSAM": 0.05, "ESAM": 0.05, "IntervalSAM": 0.1,
    "RandomSAM": 0.05, "LateSAM": 0.05, "AE-SAM": 0.05, "LookSAM": 0.05, "MSAM": 0.3,
}
OPTIMIZERS = tuple(RHO)
MODELS = ("mlp", "cnn")

#: Settings of each optimizer besides rho, as shown in the table.
SETTINGS = {
    "SGD": "", "SAM": "", "ASAM": "adaptive", "SSAM": "renormalized, unnormalized ascent",
    "ESAM": f"beta={BETA}, gamma={GAMMA}", "IntervalSAM": f"Interval(k={K})",
    "RandomSAM": f"Randomized(p={P})", "LateSAM": f"LatePhase(start={LATE_START})",
    "AE-SAM": "AESAM()", "LookSAM": f"k={K}, alpha={ALPHA}", "MSAM": "MomentumSAM",
}


# ------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """Standardized features; ``train_y`` holds the noisy labels, ``noisy`` marks the flipped ones."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    noisy: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed train/test split of digits, standardized with the training statistics."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:TEST_SIZE + TRAIN_SIZE]
    mean, std = x[train].mean(0), x[train].std(0)
    # NOTE (constant pixels): some border pixels are 0 in every training image; dividing by 1 leaves
    # them at 0 instead of dividing by zero.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]


def with_label_noise(split, fraction: float, seed: int) -> Data:
    """``split`` with ``round(fraction * n)`` training labels moved to a uniformly drawn other class."""
    train_x, train_y, test_x, test_y = split
    generator = torch.Generator().manual_seed(10_000 + seed)
    count = round(fraction * len(train_y))
    flipped = torch.randperm(len(train_y), generator=generator)[:count]
    # NOTE (symmetric noise): adding 1..9 modulo 10 reaches each of the other nine classes equally often.
    shift = torch.randint(1, 10, (count,), generator=generator)
    noisy_y = train_y.clone()
    noisy_y[flipped] = (train_y[flipped] + shift) % 10
    noisy = torch.zeros(len(train_y), dtype=torch.bool)
    noisy[flipped] = True
    return Data(train_x, noisy_y, noisy, test_x, test_y)


# ----------------------------------------------------------------------------------------- models


def make_model(kind: str) -> nn.Module:
    """A tiny MLP or CNN on the 64 digit features (initialized from torch's global generator)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * 4 * 4, 10))
    raise ValueError(f"model: expected one of {MODELS}, got {kind!r}")


class PassCounter:
    """Forward and backward passes through ``model`` (and the samples in them), counted by hooks.

    NOTE (what counts as a backward): the forward hook hooks the gradient of the model's output, which
    autograd computes once per backward pass that runs through the model; a forward under no_grad has
    an output without a graph, so it counts as a forward only (ESAM's no-grad pass).
    """

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = self.forward_samples = self.backward_samples = 0
        self.active = True
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)

    def _before_forward(self, module, args) -> None:
        if self.active:
            self.forward += 1
            self.forward_samples += args[0].shape[0]

    def _after_forward(self, module, args, output) -> None:
        if self.active and output.requires_grad:
            output.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward += 1
        self.backward_samples += grad.shape[0]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Passes inside are not counted (evaluation)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True


# ------------------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, params, *, rho: float | None, lr: float, total_steps: int, seed: int,
                   backend: str | None) -> torch.optim.Optimizer:
    """Optimizer ``name`` (a key of ``RHO``) over SGD with the shared lr, momentum and weight decay."""
    sgd = torch.optim.SGD
    base = {"lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
    sam = {"rho": rho, "backend": backend, "seed": seed, **base}
    builders: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "SGD": lambda: sgd(params, **base),
        "SAM": lambda: SAM(params, sgd, **sam),
        "ASAM": lambda: SAM(params, sgd, adaptive=True, **sam),
        "SSAM": lambda: SAM(params, sgd, renormalize=True, normalize_ascent=False, **sam),
        "ESAM": lambda: ESAM(params, sgd, beta=BETA, gamma=GAMMA, **sam),
        "IntervalSAM": lambda: SAM(params, sgd, schedule=Interval(k=K), **sam),
        "RandomSAM": lambda: SAM(params, sgd, schedule=Randomized(p=P), **sam),
        "LateSAM": lambda: SAM(params, sgd, schedule=LatePhase(start=LATE_START, total_steps=total_steps),
                               **sam),
        "AE-SAM": lambda: SAM(params, sgd, schedule=AESAM(total_steps=total_steps), **sam),
        "LookSAM": lambda: LookSAM(params, sgd, k=K, alpha=ALPHA, **sam),
        "MSAM": lambda: MomentumSAM(params, **sam),
    }
    if name not in builders:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    return builders[name]()


def expected_passes(name: str, total_steps: int) -> tuple[float, float] | None:
    """(forward, backward) passes per step of the compute model over ``total_steps`` steps; None where
    it depends on the data (AE-SAM) or on random draws (RandomSAM)."""
    sam_steps = {"IntervalSAM": math.ceil(total_steps / K), "LookSAM": math.ceil(total_steps / K),
                 "LateSAM": total_steps - math.ceil(LATE_START * total_steps)}
    if name in ("SGD", "MSAM"):
        return 1.0, 1.0
    if name in ("SAM", "ASAM", "SSAM"):
        return 2.0, 2.0
    if name == "ESAM":
        return (3.0 if GAMMA < 1 else 2.0), 2.0
    if name in sam_steps:
        passes = 1.0 + sam_steps[name] / total_steps
        return passes, passes
    return None


# --------------------------------------------------------------------------------------- training


def cosine_lr(lr: float, step: int, total_steps: int) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))


@dataclass
class Run:
    """One optimizer training one model of one seed."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    counter: PassCounter
    order: torch.Generator
    lr: float
    total_steps: int
    steps: int = 0
    epoch_seconds: list[float] = field(default_factory=list)

    def train_epoch(self, data: Data) -> None:
        """One epoch of minibatch steps (the partial batch dropped), timed."""
        loss_fn = nn.CrossEntropyLoss()
        sample_loss_fn = nn.CrossEntropyLoss(reduction="none")
        model, optimizer = self.model, self.optimizer
        started = time.perf_counter()
        order = torch.randperm(len(data.train_y), generator=self.order)
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            x, y = data.train_x[batch], data.train_y[batch]
            # NOTE (one schedule): the lr is set per step from the same cosine for every optimizer
            # (MSAM's param groups are its SGD's, so this also sets its step size).
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(self.lr, self.steps, self.total_steps)
            if isinstance(optimizer, ESAM):
                optimizer.sds_step(sample_losses_closure(model, x, y, sample_loss_fn))
            else:
                def closure(x=x, y=y) -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    return loss

                optimizer.step(closure)
            self.steps += 1
        self.epoch_seconds.append(time.perf_counter() - started)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy at the unperturbed weights, not counted as passes."""
        unperturbed = (self.optimizer.unperturbed() if isinstance(self.optimizer, MomentumSAM)
                       else contextlib.nullcontext())
        # NOTE (MSAM): between steps its weights sit at w - rho v / ||v||; the model is w.
        with unperturbed, self.counter.paused():
            self.model.eval()
            correct = (self.model(x).argmax(dim=1) == y).float().mean().item()
            self.model.train()
        return correct


class Progress:
    """tqdm when installed, else a progress line on stderr."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.started = time.perf_counter()
        self.bar = None
        self.last_printed = -1
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="epoch", file=sys.stderr)

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(1)
            return
        percent = 100 * self.done // self.total
        interactive = sys.stderr.isatty()
        if not interactive and percent // 10 == self.last_printed // 10 and self.done < self.total:
            return  # NOTE: without a terminal, one line per 10% keeps logs short
        self.last_printed = percent
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done)
        line = (f"{label:<24} {self.done}/{self.total} epochs ({percent:3d}%)  "
                f"{elapsed:6.1f} s elapsed, ~{left:5.1f} s left")
        print(("\r" + line) if interactive else line, end="" if interactive else "\n", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def run_seed(kind: str, names: list[str], data: Data, *, seed: int, epochs: int, lr: float,
             rho: dict[str, float | None], backend: str | None, progress: Progress) -> dict[str, dict]:
    """Train every optimizer of ``names`` on model ``kind`` from one initialization, interleaved by
    epoch; return each one's measurements."""
    steps_per_epoch = len(data.train_y) // BATCH
    total_steps = epochs * steps_per_epoch
    torch.manual_seed(seed)
    initial = make_model(kind)
    runs = []
    for name in names:
        model = copy.deepcopy(initial)
        optimizer = make_optimizer(name, model.parameters(), rho=rho[name], lr=lr, total_steps=total_steps,
                                   seed=seed, backend=backend)
        runs.append(Run(name, model, optimizer, PassCounter(model),
                        torch.Generator().manual_seed(20_000 + seed), lr, total_steps))
    for epoch in range(epochs):
        # NOTE (interleaving): each epoch starts with the next optimizer, so no optimizer always runs
        # first (cold caches) or last; results do not depend on the order (no global RNG is used).
        shift = epoch % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.train_epoch(data)
            progress.update(f"seed {seed} {kind} {run.name}")
    results = {}
    for run in runs:
        counter = run.counter
        results[run.name] = {
            "test_accuracy": run.accuracy(data.test_x, data.test_y),
            "train_accuracy_noisy_labels": run.accuracy(data.train_x, data.train_y),
            "noisy_labels_fit": run.accuracy(data.train_x[data.noisy], data.train_y[data.noisy]),
            "steps": run.steps,
            "forward_passes_per_step": counter.forward / run.steps,
            "backward_passes_per_step": counter.backward / run.steps,
            "forward_batches_per_step": counter.forward_samples / (run.steps * BATCH),
            "backward_batches_per_step": counter.backward_samples / (run.steps * BATCH),
            "epoch_seconds": sum(run.epoch_seconds) / len(run.epoch_seconds),
        }
    return results


# ---------------------------------------------------------------------------------------- summary


def summarize(per_seed: list[dict[str, dict]], names: list[str], total_steps: int,
              rho: dict[str, float | None]) -> dict[str, dict]:
    """Per optimizer: means and spreads over the seeds, the compute model, and the gain kept."""
    summary = {}
    for name in names:
        rows = [seed_results[name] for seed_results in per_seed]
        accuracy = [row["test_accuracy"] for row in rows]
        entry = {
            "rho": rho[name], "settings": SETTINGS[name],
            "test_accuracy": accuracy,
            "test_accuracy_mean": statistics.fmean(accuracy),
            "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "expected_passes_per_step": expected_passes(name, total_steps),
            "epoch_seconds": [row["epoch_seconds"] for row in rows],
            "epoch_seconds_median": statistics.median(row["epoch_seconds"] for row in rows),
        }
        for key in ("train_accuracy_noisy_labels", "noisy_labels_fit", "forward_passes_per_step",
                    "backward_passes_per_step", "forward_batches_per_step", "backward_batches_per_step"):
            entry[key] = statistics.fmean(row[key] for row in rows)
        entry["backward_passes_per_step_by_seed"] = [row["backward_passes_per_step"] for row in rows]
        summary[name] = entry
    gap = None
    if "SGD" in summary and "SAM" in summary:
        gap = summary["SAM"]["test_accuracy_mean"] - summary["SGD"]["test_accuracy_mean"]
    for name, entry in summary.items():
        kept = None
        if gap is not None and gap > 0 and name not in ("SGD", "SAM"):
            kept = (entry["test_accuracy_mean"] - summary["SGD"]["test_accuracy_mean"]) / gap
        entry["gain_kept"] = kept
        if "SGD" in summary:
            entry["time_vs_sgd"] = entry["epoch_seconds_median"] / summary["SGD"]["epoch_seconds_median"]
    return summary


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    header = ("| model | optimizer | rho | settings | test acc (%) | noise fit (%) | fwd/step | bwd/step "
              "| bwd batches/step | ms/epoch | time / SGD | gain kept |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for kind, summary in results.items():
        for name, entry in summary.items():
            rho = "" if entry["rho"] is None else f"{entry['rho']:g}"
            kept = "" if entry["gain_kept"] is None else f"{entry['gain_kept']:.2f}"
            ratio = f"{entry['time_vs_sgd']:.2f}" if "time_vs_sgd" in entry else ""
            lines.append(
                f"| {kind} | {name} | {rho} | {entry['settings']} | "
                f"{100 * entry['test_accuracy_mean']:.1f} ± {100 * entry['test_accuracy_std']:.1f} | "
                f"{100 * entry['noisy_labels_fit']:.0f} | "
                f"{entry['forward_passes_per_step']:.2f} | {entry['backward_passes_per_step']:.2f} | "
                f"{entry['backward_batches_per_step']:.2f} | {1000 * entry['epoch_seconds_median']:.0f} | "
                f"{ratio} | {kept} |")
    return "\n".join(lines)


def _label_positions(points: list[tuple[float, float]], gap: float,
                     shift: float) -> list[tuple[float, float]]:
    """Where to write the labels of ``points`` (x, y): points with about the same x (to one decimal)
    form a column whose labels line up ``shift`` right of its rightmost point, at the points' heights
    pushed apart to at least ``gap``."""
    columns: dict[float, list[int]] = {}
    for index, (x, _) in enumerate(points):
        columns.setdefault(round(x, 1), []).append(index)
    positions = list(points)
    for members in columns.values():
        members.sort(key=lambda i: points[i][1])
        right = max(points[i][0] for i in members) + shift
        height = -math.inf
        for i in members:
            height = max(points[i][1], height + gap)
            positions[i] = (right, height)
    return positions


def plot(results: dict[str, dict[str, dict]], path: Path, subtitle: str) -> bool:
    """Accuracy against measured backward passes per step; False (with a note) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed; no figure written", file=sys.stderr)
        return False
    names = list(next(iter(results.values())))
    markers = "osD^v<>pPX*h"
    colors = [f"C{i}" for i in range(10)] + ["black"]
    figure = Figure(figsize=(6 * len(results), 5), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, (kind, summary) in zip(axes, results.items()):
        points = [(summary[name]["backward_passes_per_step"], 100 * summary[name]["test_accuracy_mean"])
                  for name in names]
        for index, (name, (x, y)) in enumerate(zip(names, points)):
            ax.errorbar(x, y, yerr=100 * summary[name]["test_accuracy_std"],
                        fmt=markers[index % len(markers)], color=colors[index % len(colors)], capsize=3,
                        label=name)
        low, high = min(y for _, y in points), max(y for _, y in points)
        labels = _label_positions(points, gap=0.045 * max(high - low, 1.0), shift=0.03)
        for name, point, label in zip(names, points, labels):
            moved = label[1] != point[1]
            ax.annotate(name, point, xytext=label, fontsize="x-small", va="center",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if moved else None)
        for reference, style in (("SGD", ":"), ("SAM", "--")):
            if reference in summary:
                ax.axhline(100 * summary[reference]["test_accuracy_mean"], color="0.5", ls=style, lw=0.8)
        ax.set_xlim(0.9, 2.35)
        ax.set_xlabel("backward passes per step (measured)")
        ax.set_ylabel("clean test accuracy (%), mean ± std over seeds")
        ax.set_title(f"{kind} (dotted: SGD, dashed: SAM)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="best")
    figure.suptitle(f"digits, {subtitle}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    return True


def _subtitle(noise: float, seeds: int, epochs: int) -> str:
    return f"{noise:.0%} label noise, {seeds} seed(s), {epochs} epochs"


def _parse_rho(items: list[str]) -> dict[str, float | None]:
    rho = dict(RHO)
    for item in items:
        name, _, value = item.partition("=")
        if name not in RHO or RHO[name] is None or not value:
            raise SystemExit(f"--rho: expected NAME=VALUE with NAME one of "
                             f"{[n for n, r in RHO.items() if r is not None]}, got {item!r}")
        rho[name] = float(value)
    return rho


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it writes to the JSON file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generalization",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per run")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke setting: 1 seed, {QUICK_EPOCHS} epochs (overrides --seeds/--epochs)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS,
                        metavar="NAME", help=f"subset of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--rho", action="append", default=[], metavar="NAME=VALUE",
                        help="override one optimizer's rho (repeatable)")
    parser.add_argument("--lr", type=float, default=LR, help="peak lr of the cosine schedule (all)")
    parser.add_argument("--noise", type=float, default=NOISE, help="fraction of noisy training labels")
    parser.add_argument("--backend", default="auto", choices=["auto", *backends.BACKEND_NAMES],
                        help="op backend of the sam_kernels optimizers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help="figure file")
    parser.add_argument("--no-figure", action="store_true", help="skip the figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument("--plot-from", type=Path, metavar="JSON",
                        help="only draw the figure from a results file written earlier")
    args = parser.parse_args(argv)
    if args.plot_from is not None:
        with open(args.plot_from, encoding="utf-8") as handle:
            record = json.load(handle)
        config = record["config"]
        if plot(record["results"], args.figure, _subtitle(config["label_noise"], config["seeds"],
                                                          config["epochs"])):
            print(f"figure: {args.figure}")
        return record
    seeds, epochs = (1, QUICK_EPOCHS) if args.quick else (args.seeds, args.epochs)
    if seeds < 1 or epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    rho = _parse_rho(args.rho)
    backend = None if args.backend == "auto" else args.backend
    names = [name for name in OPTIMIZERS if name in args.optimizers]
    torch.set_num_threads(args.threads)
    backend_name, backend_reason = backends.resolve(torch.device("cpu"), backend)

    started = time.perf_counter()
    split = load_split()
    steps_per_epoch = TRAIN_SIZE // BATCH
    total_steps = epochs * steps_per_epoch
    print(f"digits: {TRAIN_SIZE} train ({args.noise:.0%} noisy labels) / {TEST_SIZE} test; {seeds} seed(s) "
          f"x {epochs} epochs x {steps_per_epoch} steps of {BATCH}; lr {args.lr:g} cosine; backend "
          f"{backend_name}; {args.threads} thread(s)", flush=True)
    progress = Progress(seeds * len(args.models) * epochs * len(names), enabled=not args.no_progress)
    per_seed: dict[str, list[dict]] = {kind: [] for kind in args.models}
    for seed in range(seeds):
        data = with_label_noise(split, args.noise, seed)
        for kind in args.models:
            per_seed[kind].append(run_seed(kind, names, data, seed=seed, epochs=epochs, lr=args.lr, rho=rho,
                                           backend=backend, progress=progress))
    progress.close()
    results = {kind: summarize(per_seed[kind], names, total_steps, rho) for kind in args.models}
    elapsed = time.perf_counter() - started

    table = markdown_table(results)
    print("\n" + table + "\n")
    for kind, summary in results.items():
        if "SGD" in summary and "SAM" in summary:
            gap = 100 * (summary["SAM"]["test_accuracy_mean"] - summary["SGD"]["test_accuracy_mean"])
            print(f"{kind}: SAM - SGD = {gap:+.1f} points (gain kept is relative to this)")
    config = {"seeds": seeds, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch": BATCH,
              "lr": args.lr, "lr_schedule": "cosine per step to 0", "momentum": MOMENTUM,
              "weight_decay": WEIGHT_DECAY, "label_noise": args.noise, "train_size": TRAIN_SIZE,
              "test_size": TEST_SIZE, "split_seed": SPLIT_SEED, "quick": args.quick,
              "threads": args.threads, "backend": backend_name, "backend_reason": backend_reason,
              "torch": torch.__version__}
    record = {"config": config, "seconds": elapsed, "results": results, "table": table}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, allow_nan=False)
    print(f"record: {args.json}")
    if not args.no_figure and plot(results, args.figure, _subtitle(args.noise, seeds, epochs)):
        print(f"figure: {args.figure}")
    print(f"time: {elapsed:.1f} s")
    return record


if __name__ == "__main__":
    main()
