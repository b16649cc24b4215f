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
    GSAM, WSAM, Friendly-SAM, VaSSO, Fisher-SAM, GC-SAM
                 as SAM: what they add to the ascent or the descent is optimizer-side work (multi-tensor
                 ops, not fused yet); run at their classes' defaults: GSAM alpha 0.2 with rho
                 proportional to the lr, WSAM gamma 0.9 decoupled, Friendly-SAM lambd 0.9, VaSSO theta
                 0.9, Fisher-SAM eta 1
    cheap        3F + f x 3F, f the fraction of steps that run the second pass: counted while timing
                 (interval k = 5 and LookSAM k = 5: f = 0.2; randomized p = 0.5: about 0.5; AE-SAM:
                 data dependent); Momentum SAM 3F (no second pass), over SGD and over AdamW alike
    MultiStepSAM (n + 1) x 3F = 9F at n = 2 ascent steps
    micro-batch SAM
                 6F in samples, as SAM: both passes of each of k = 4 micro-batches of a quarter batch
                 (smaller passes, so less efficient on a device that a full batch fills)
    SparseSAM-F, SparseSAM-D
                 as SAM: sparsity 0.5, the mask refreshed every 2000 steps (the class's default), so
                 the timed steps are masked SAM steps and the refresh is amortized away
    BayesianSAM  as SAM (the sample's noise and the Adam-like update are optimizer-side work), at its
                 class defaults (lr 0.5, rho 0.01, damping 0.1) with N = 50000

Every row runs over SGD with momentum 0.9 and weight decay 5e-4, except bSAM (standalone) and
"Momentum SAM (AdamW)": MomentumSAM over torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999), decoupled
weight decay 0.01, rho 0.3), one pass per step; its only extra cost over SGD is AdamW's step and the
perturbation, optimizer-side work (no plain AdamW row: the pass count is what the ratio is read against).

The variants are interleaved across ``--repeats`` rounds (machine noise hits all alike); the table gives
the median with the spread (min-max) of the images per second.

    python -m benchmarks.training [--models resnet18 vit_tiny] [--batch 128] [--steps N] [--repeats R]
        [--variants VARIANT ...] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.eager import EagerESAM, EagerSAM
from benchmarks.models import MODELS
from sam_kernels.optim import (
    AESAM,
    ESAM,
    GCSAM,
    GSAM,
    SAM,
    WSAM,
    BayesianSAM,
    FisherSAM,
    FriendlySAM,
    Interval,
    LookSAM,
    MomentumSAM,
    MultiStepSAM,
    ProportionalRho,
    Randomized,
    SparseSAM,
    VaSSO,
    sample_losses_closure,
)

LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.05, 0.9, 5e-4, 0.05
BETA, GAMMA = 0.6, 0.5  # the ESAM paper's ResNet-18 setting
K = 5  # interval SAM's and LookSAM's period
MSAM_RHO = 0.3  # the Momentum SAM code's default
#: Momentum SAM over AdamW: AdamW's lr (torch's default), betas and decoupled weight decay.
ADAMW_LR, ADAMW_BETAS, ADAMW_WEIGHT_DECAY = 1e-3, (0.9, 0.999), 0.01
MSAM_ADAMW = "Momentum SAM (AdamW)"
ASCENT_STEPS = 2  # multi-step SAM's ascent steps
MICRO_BATCHES = 4  # micro-batch SAM's micro-batches per step
BSAM_NUM_DATA = 50_000  # bSAM's N: CIFAR-10's training set, whose shapes the data has
#: The rows with one forward and backward per step; every other row without a measured second-pass
#: fraction runs two, except multi-step SAM's (ascent_steps + 1).
ONE_PASS = ("SGD", "Momentum SAM", MSAM_ADAMW)
MULTI_STEP = f"sam_kernels MultiStepSAM (n={ASCENT_STEPS})"


def compute_model(variant: str, second_pass_fraction: float | None = None) -> float:
    """Cost of one step in forward units (see the module docstring); ``second_pass_fraction``: the
    measured fraction of steps with a second pass, for the variants that skip it on some steps."""
    if second_pass_fraction is not None:
        return 3.0 + 3.0 * second_pass_fraction
    if variant.endswith("ESAM"):
        return 3 + BETA + 3 * GAMMA
    if variant in ONE_PASS:
        return 3.0
    if variant == MULTI_STEP:
        return 3.0 * (1 + ASCENT_STEPS)
    return 6.0


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


class SecondPasses:
    """Counts the steps that ran the second forward and backward (and all steps)."""

    def __init__(self) -> None:
        self.steps = self.second = 0

    def fraction(self) -> float:
        return self.second / max(self.steps, 1)


def scheduled_step(model, optimizer):
    """The two-call loop that asks the optimizer whether the second pass runs; the step function carries
    its ``SecondPasses`` counter."""
    passes = SecondPasses()

    def step(inputs, targets):
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.first_step(zero_grad=True)
        passes.steps += 1
        if optimizer.needs_second_pass():
            passes.second += 1
            per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.second_step(zero_grad=True)

    step.passes = passes
    return step


def momentum_sam_step(model, base="sgd"):
    """Momentum SAM's one backward and ``step()``: over SGD (``base="sgd"``) or over AdamW
    (``"adamw"``, perturbing along AdamW's first moment)."""
    if base == "adamw":
        optimizer = MomentumSAM(model.parameters(), lr=ADAMW_LR, rho=MSAM_RHO,
                                base_optimizer=torch.optim.AdamW, betas=ADAMW_BETAS,
                                weight_decay=ADAMW_WEIGHT_DECAY)
    else:
        optimizer = MomentumSAM(model.parameters(), lr=LR, momentum=MOMENTUM, rho=MSAM_RHO,
                                weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def sam_kernels_schedule_step(model, schedule, rho=RHO):
    return scheduled_step(model, SAM(model.parameters(), torch.optim.SGD, rho=rho, schedule=schedule, lr=LR,
                                     momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))


def looksam_step(model):
    return scheduled_step(model, LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=K, alpha=0.7,
                                         lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))


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


def two_pass_family_step(model, variant, **options):
    """A SAM-family optimizer (``variant``: its class, with ``options``) in the two-call loop; GSAM's
    radius follows the lr as its paper ties them (constant here, as the lr is)."""
    optimizer = variant(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                        weight_decay=WEIGHT_DECAY, **options)
    step = two_pass_step(model, optimizer)
    if variant is not GSAM:
        return step
    rho_schedule = ProportionalRho(optimizer, rho_max=RHO, rho_min=0.0, lr_max=LR, lr_min=0.0)

    def gsam_step(inputs, targets):
        step(inputs, targets)
        rho_schedule.step()

    return gsam_step


def multi_step_sam_step(model):
    """Multi-step SAM's two-call loop: first_step after the first backward and after each of the next
    n - 1 (inside second_pass), the last backward inside second_pass, then second_step."""
    optimizer = MultiStepSAM(model.parameters(), torch.optim.SGD, rho=RHO, ascent_steps=ASCENT_STEPS, lr=LR,
                             momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.first_step(zero_grad=True)
        for _ in range(ASCENT_STEPS - 1):
            with optimizer.second_pass():
                per_sample_loss(model(inputs), targets).mean().backward()
            optimizer.first_step(zero_grad=True)
        with optimizer.second_pass():
            per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.second_step(zero_grad=True)

    return step


def micro_batch_sam_step(model, micro_batches=MICRO_BATCHES):
    """Micro-batch SAM (m-sharpness) on plain SAM in the two-call loop: each micro-batch's own ascent and
    second pass, ``accumulate()`` after every one but the last, ``second_step()`` after the last; each
    micro-batch's loss divided by their count (the descent on the mean of their SAM gradients)."""
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                    weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        chunks = list(zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)))
        for index, (x, y) in enumerate(chunks):
            (per_sample_loss(model(x), y).mean() / len(chunks)).backward()
            optimizer.first_step(zero_grad=True)
            with optimizer.second_pass():
                (per_sample_loss(model(x), y).mean() / len(chunks)).backward()
            if index < len(chunks) - 1:
                optimizer.accumulate()
            else:
                optimizer.second_step(zero_grad=True)

    return step


def bsam_step(model):
    """bSAM (standalone, Adam-like) at its class defaults (the official CIFAR-10 run's lr 0.5, rho 0.01,
    betas (0.9, 0.999), damping 0.1) with N = 50000: the sample, the backward there, the ascent, the
    backward at w + e, the update."""
    optimizer = BayesianSAM(model.parameters(), num_data=BSAM_NUM_DATA)

    def step(inputs, targets):
        optimizer.sample_noise()
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.first_step(zero_grad=True)
        per_sample_loss(model(inputs), targets).mean().backward()
        optimizer.second_step(zero_grad=True)

    return step


#: NOTE (AE-SAM's horizon): its threshold moves over ``total_steps``; the benchmark's run is short, so
#: the horizon is set to a typical training length and the measured fraction of SAM steps is reported.
AESAM_HORIZON = 1000

VARIANTS = {
    "SGD": sgd_step,
    "eager SAM": eager_sam_step,
    "eager ESAM": eager_esam_step,
    "sam_kernels SAM": sam_kernels_sam_step,
    "sam_kernels ESAM": sam_kernels_esam_step,
    "sam_kernels SSAM": lambda model: sam_kernels_sam_step(model, renormalize=True),
    f"interval SAM (k={K})": lambda model: sam_kernels_schedule_step(model, Interval(K), rho=2 * RHO),
    "randomized SAM (p=0.5)": lambda model: sam_kernels_schedule_step(model, Randomized(0.5)),
    "AE-SAM": lambda model: sam_kernels_schedule_step(model, AESAM(AESAM_HORIZON)),
    f"LookSAM (k={K})": looksam_step,
    "Momentum SAM": momentum_sam_step,
    MSAM_ADAMW: lambda model: momentum_sam_step(model, base="adamw"),
    "sam_kernels GSAM": lambda model: two_pass_family_step(model, GSAM, alpha=0.2),
    "sam_kernels WSAM": lambda model: two_pass_family_step(model, WSAM, gamma=0.9),
    "sam_kernels FriendlySAM": lambda model: two_pass_family_step(model, FriendlySAM, lambd=0.9),
    "sam_kernels VaSSO": lambda model: two_pass_family_step(model, VaSSO, theta=0.9),
    "sam_kernels FisherSAM": lambda model: two_pass_family_step(model, FisherSAM, eta=1.0),
    "sam_kernels GCSAM": lambda model: two_pass_family_step(model, GCSAM),
    MULTI_STEP: multi_step_sam_step,
    f"micro-batch SAM (k={MICRO_BATCHES})": micro_batch_sam_step,
    "sam_kernels SparseSAM-F": lambda model: two_pass_family_step(model, SparseSAM, criterion="fisher"),
    "sam_kernels SparseSAM-D": lambda model: two_pass_family_step(model, SparseSAM, criterion="dynamic"),
    "sam_kernels BayesianSAM": bsam_step,
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant, model_name, device, batch, steps, warmup, seed=0):
    """(images per second, peak memory in MiB or None, fraction of timed steps with a second pass or
    None) of ``steps`` training steps after ``warmup``."""
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
    passes = getattr(step, "passes", None)
    if passes is not None:
        passes.steps = passes.second = 0
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
    return batch * steps / seconds, peak, passes.fraction() if passes is not None else None


def progress(variant, model_name, phase, done, total, width=20):
    filled = width * done // total
    sys.stderr.write(f"\r{model_name:<9} {variant:<22} {phase:<8} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total}")
    sys.stderr.flush()


def run(models, device, batch, steps, warmup, repeats=1, variants=None):
    """Every variant (SGD and eager SAM always, as the references) ``repeats`` times, interleaved; rows
    with the median and the spread."""
    chosen = [v for v in VARIANTS if variants is None or v in variants or v in ("SGD", "eager SAM")]
    rows = []
    for model_name in models:
        samples = {variant: [] for variant in chosen}
        for _ in range(repeats):
            for variant in chosen:
                samples[variant].append(measure(variant, model_name, device, batch, steps, warmup))
        median = {v: statistics.median(s[0] for s in runs) for v, runs in samples.items()}
        sgd, sam = median["SGD"], median["eager SAM"]
        for variant, runs in samples.items():
            fractions = [s[2] for s in runs if s[2] is not None]
            fraction = statistics.mean(fractions) if fractions else None
            peaks = [s[1] for s in runs if s[1] is not None]
            cost = compute_model(variant, fraction)
            rows.append({
                "model": model_name, "variant": variant, "images_per_s": median[variant],
                "images_per_s_min": min(s[0] for s in runs), "images_per_s_max": max(s[0] for s in runs),
                "repeats": repeats, "second_pass_fraction": fraction,
                "vs_eager_sam": median[variant] / sam, "vs_sgd": median[variant] / sgd,
                "model_vs_eager_sam": compute_model("eager SAM") / cost,
                "model_vs_sgd": compute_model("SGD") / cost, "peak_mb": max(peaks) if peaks else None})
        print(format_table([r for r in rows if r["model"] == model_name]), flush=True)
    return rows


def format_table(rows):
    width = max(24, *(len(r["variant"]) + 1 for r in rows))
    lines = [f"\n{rows[0]['model']}: images/s median (min-max over {rows[0]['repeats']}), measured ratio "
             "(compute-model ratio)",
             f"{'variant':<{width}} {'img/s':>9} {'spread':>15} {'vs eager SAM':>18} {'vs SGD':>18} "
             f"{'2nd pass':>8} {'peak MB':>8}"]
    for r in rows:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        fraction = "" if r["second_pass_fraction"] is None else f"{r['second_pass_fraction']:.2f}"
        spread = f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}"
        lines.append(f"{r['variant']:<{width}} {r['images_per_s']:>9.1f} {spread:>15} "
                     f"{r['vs_eager_sam']:>9.2f}x ({r['model_vs_eager_sam']:.2f}x) "
                     f"{r['vs_sgd']:>9.2f}x ({r['model_vs_sgd']:.2f}x) {fraction:>8} {peak:>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 50 on GPU, 5 on CPU; a multiple of 5 so that the "
                             "periodic variants time their average step)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps (default 10 on GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds over every variant (default 3 on GPU, 2 on CPU)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="VARIANT",
                        help="a subset of the variants (SGD and eager SAM always run); default: all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    repeats = args.repeats or (3 if on_gpu else 2)
    rows = run(args.models, device, args.batch, steps, warmup, repeats, args.variants)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"training_{device.type}.json"
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    path.write_text(json.dumps({"device": name, "batch": args.batch, "steps": steps, "repeats": repeats,
                                "rows": rows}, indent=2))
    print(f"\nresults in {path}")


if __name__ == "__main__":
    main()
