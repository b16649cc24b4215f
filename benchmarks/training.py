"""End-to-end training throughput: images per second of SGD, eager SAM/ESAM and sam_kernels' optimizers.

Synthetic CIFAR-shaped data (32x32, 10 classes). On a GPU the steps are timed with CUDA events after a
warm-up; on a CPU the same code runs fewer steps. Beside the measured ratios it prints each variant's
compute model in forward-pass units F (a backward costs about 2F: F for the input gradients and F for
the weight gradients):

    SGD          F + 2F                                    = 3F
    SAM          2 x (F + 2F)                              = 6F
    ESAM         F + (F + beta F) + F + gamma (F + 2F)     = (3 + beta + 3 gamma) F
                 (full forward, SWP-pruned backward, no-grad forward at w + e, forward and backward on
                 the selected gamma fraction)
    SSAM         as SAM (the renormalization is optimizer-side work)

    python -m benchmarks.training [--models resnet18 vit_tiny] [--batch 128] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.eager import EagerESAM, EagerSAM
from benchmarks.models import MODELS
from sam_kernels.optim import ESAM, SAM, sample_losses_closure

LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.05, 0.9, 5e-4, 0.05
BETA, GAMMA = 0.6, 0.5  # the ESAM paper's ResNet-18 setting


def compute_model(variant: str) -> float:
    """Cost of one step in forward units (see the module docstring)."""
    if variant.endswith("ESAM"):
        return 3 + BETA + 3 * GAMMA
    if variant.endswith("SAM"):
        return 6.0
    return 3.0


def per_sample_loss(logits, targets):
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def sgd_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def two_pass_step(model, optimizer):
    """The two-call SAM loop: backward at w, first_step, backward at w + e, second_step."""

    def step(inputs, targets):
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.first_step(zero_grad=True)
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.second_step(zero_grad=True)

    return step


def eager_sam_step(model):
    return two_pass_step(model, EagerSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
                                         momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))


def eager_esam_step(model):
    optimizer = EagerESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=BETA, gamma=GAMMA, lr=LR,
                          momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return lambda inputs, targets: optimizer.step_with(model, per_sample_loss, inputs, targets)


def sam_kernels_sam_step(model, renormalize=False):
    return two_pass_step(model, SAM(model.parameters(), torch.optim.SGD, rho=RHO, renormalize=renormalize,
                                    lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))


def sam_kernels_esam_step(model):
    optimizer = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=BETA, gamma=GAMMA, lr=LR,
                     momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        optimizer.sds_step(sample_losses_closure(model, inputs, targets, per_sample_loss))
        optimizer.zero_grad()

    return step


VARIANTS = {
    "SGD": sgd_step,
    "eager SAM": eager_sam_step,
    "eager ESAM": eager_esam_step,
    "sam_kernels SAM": sam_kernels_sam_step,
    "sam_kernels ESAM": sam_kernels_esam_step,
    "sam_kernels SSAM": lambda model: sam_kernels_sam_step(model, renormalize=True),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant, model_name, device, batch, steps, warmup, seed=0):
    """(images per second, peak memory in MiB or None) of ``steps`` training steps after ``warmup``."""
    torch.manual_seed(seed)
    model = MODELS[model_name]().to(device)
    model.train()
    step = VARIANTS[variant](model)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    targets = torch.randint(0, 10, (batch,), generator=generator).to(device)
    for i in range(warmup):
        progress(variant, model_name, "warm-up", i + 1, warmup)
        step(inputs, targets)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    for i in range(steps):
        progress(variant, model_name, "timed", i + 1, steps)
        step(inputs, targets)
    if device.type == "cuda":
        end.record()
        synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        seconds, peak = time.perf_counter() - began, None
    sys.stderr.write("\n")
    return batch * steps / seconds, peak


def progress(variant, model_name, phase, done, total, width=20):
    filled = width * done // total
    sys.stderr.write(f"\r{model_name:<9} {variant:<22} {phase:<8} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total}")
    sys.stderr.flush()


def run(models, device, batch, steps, warmup):
    rows = []
    for model_name in models:
        results = {v: measure(v, model_name, device, batch, steps, warmup) for v in VARIANTS}
        sgd, sam = results["SGD"][0], results["eager SAM"][0]
        for variant, (images_per_s, peak) in results.items():
            rows.append({
                "model": model_name, "variant": variant, "images_per_s": images_per_s,
                "vs_eager_sam": images_per_s / sam, "vs_sgd": images_per_s / sgd,
                "model_vs_eager_sam": compute_model("eager SAM") / compute_model(variant),
                "model_vs_sgd": compute_model("SGD") / compute_model(variant), "peak_mb": peak})
        print(format_table([r for r in rows if r["model"] == model_name]), flush=True)
    return rows


def format_table(rows):
    lines = [f"\n{rows[0]['model']}: images/s, measured ratio (compute-model ratio)",
             f"{'variant':<24} {'img/s':>9} {'vs eager SAM':>18} {'vs SGD':>18} {'peak MB':>8}"]
    for r in rows:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{r['variant']:<24} {r['images_per_s']:>9.1f} "
                     f"{r['vs_eager_sam']:>9.2f}x ({r['model_vs_eager_sam']:.2f}x) "
                     f"{r['vs_sgd']:>9.2f}x ({r['model_vs_sgd']:.2f}x) {peak:>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 50 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps (default 10 on GPU, 1 on CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (50 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    rows = run(args.models, device, args.batch, steps, warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"training_{device.type}.json"
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    path.write_text(json.dumps({"device": name, "batch": args.batch, "steps": steps, "rows": rows}, indent=2))
    print(f"\nresults in {path}")


if __name__ == "__main__":
    main()
