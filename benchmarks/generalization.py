"""Generalization against cost: SGD, SAM and its variants, each at the radius (and main hyper-parameter)
picked on a validation split, then test accuracy and measured passes per step.

Why a sweep. At one shared rho the accuracies mostly measure how strong each variant's perturbation is,
not how good its direction or descent is: plain SAM on the mlp below (quick setting, one seed) scores
54.9% on the validation split at rho 0.1, 57.9% at 0.3 and at 0.4, 45.5% at 0.6 and about chance from
0.9 on (validation labels are noisy: see below), and the variants' best radii differ by up to ten times.
So every variant gets its own small grid of radii (times its hyper-parameter's values, where it has one),
each setting is scored on a validation split carved from the training images, the best is kept, and
only that setting is run on fresh seeds and read on the test split.

Data. scikit-learn's digits (1797 8x8 images, shipped with the package, no download), one fixed
permutation (seed 0): 500 test images, and 1297 training images of which 297 are held out as the
validation split and 1000 are trained on (15 steps of 64 per epoch, the partial batch dropped); features
standardized with the mean and std of those 1000. Per seed, 40% of the training labels, in the trained
part and in the validation part alike, are replaced by a label drawn uniformly from the other nine
classes (symmetric noise); the test labels stay clean. The validation accuracy is therefore read on noisy
labels, as it would be in practice: with symmetric noise eta over ten classes a clean accuracy a reads as
(1 - eta) a + eta (1 - a) / 9, increasing in a, so ranking settings on it ranks them on clean accuracy
(the values are lower: 90% clean reads as about 54%).

Protocol, per model:

1. Sweep: for each sweep seed (0, 1, ...) every setting of every variant trains from the same weights
   with the same noisy labels and minibatch order, interleaved one epoch each in turn; each is scored on
   the validation split. This phase is handed the training data only (``TrainingData``: the trained part
   and the validation part); the test split is not passed to it.
2. Choice: per variant, the setting with the highest mean validation accuracy over the sweep seeds
   (ties to the earlier one in grid order, the smaller radius). A choice at either end of the radius grid
   is marked in the table: the best radius may lie beyond it.
3. Report: the chosen settings train on the report seeds, which follow the sweep seeds (so neither their
   validation nor their test scores took part in the choice), and are read on the test split after the
   last epoch (no early stopping): test accuracy mean and std over those seeds, training accuracy on the
   flipped labels ("noise fit": how much of the noise a run memorized), passes per step, time per epoch.

Models: ``mlp`` (64-128-128-10, ReLU) and ``cnn`` (two 3x3 conv layers of 16 and 32 channels with ReLU,
2x2 max-pool, linear head 512-10). Every optimizer but bSAM runs over SGD with momentum 0.9 and weight
decay 5e-4, lr 0.05 decayed to 0 by a cosine per step, identical for all; bSAM (an Adam-like optimizer
of its own), AdamW and Momentum SAM over AdamW follow the same cosine from their own peak lr.

The default is the quick setting (a few minutes on two CPU cores): the mlp, the three-radius grid, 20
epochs, one sweep seed and three report seeds. ``--full``: both models, the six-radius grid, 40 epochs,
two sweep seeds and five report seeds (about 50x the work, hours on two cores: an epoch of the cnn costs
6 to 8 of the mlp's).

Optimizers, the radius grid of each (its scale times the base grid: quick 0.1, 0.3, 0.9; full 0.05, 0.1,
0.2, 0.4, 0.8, 1.6), the swept hyper-parameter, and the compute model per step in forward (F) and
backward (B) passes of the model on the minibatch:

    SGD          1 F, 1 B                  no radius
    SAM          2 F, 2 B                  scale 1 (gradient at w, then at w + e)
    ASAM         2 F, 2 B                  adaptive; scale 10 (its radius is relative to |w|)
    SSAM         2 F, 2 B                  e = rho g unnormalized, descent gradient rescaled to ||g||;
                                           scale 1 (||g|| stays between about 0.4 and 1.6 here)
    ESAM         3 F, 2 B                  beta 0.6, gamma 0.5; scale 1: full batch at w (forward,
                                           SWP-pruned backward), a no-grad full batch at w + e, the
                                           selected half at w + e (forward, backward); in batches of
                                           work 2.5 forward, 1.5 backward
    IntervalSAM  1 + 1/k F and B           Interval(k=5); scale 3
    RandomSAM    1 + p on average          Randomized(p=0.5); scale 3
    LateSAM      1 + 1/2                   LatePhase(start=0.5): SAM for the last half; scale 3
    AE-SAM       1 + (share of SAM steps)  AESAM (decay 0.9, lambda 1 -1, lambda 2 1); scale 3; the
                                           share depends on the gradient norms
    LookSAM      1 + 1/k                   k 5, alpha 0.7; scale 1 (plain steps reuse g_v)
    MSAM         1 F, 1 B                  MomentumSAM; scale 6 (its official rho 0.3 is 6x SAM's 0.05)
    GSAM         2 F, 2 B                  alpha in {0.1, 0.3} (0.2 in the authors' example); rho
                                           proportional to the lr (ProportionalRho from rho at the peak
                                           lr to 0 at lr 0, as the paper ties them); scale 1
    WSAM         2 F, 2 B                  decoupled; gamma in {0.8, 0.9} (0.9 the paper's default;
                                           alpha = gamma / (1 - gamma) = 4 or 9); scale 1 (the weighted
                                           term steps outside momentum 0.9, which takes back most of
                                           alpha's factor)
    FriendlySAM  2 F, 2 B                  sigma 1; lambd in {0.6, 0.95} (the authors' training
                                           scripts' two values); scale 1
    VaSSO        2 F, 2 B                  theta in {0.4, 0.9} (0.9 the authors' default); scale 1
    FisherSAM    2 F, 2 B                  eta in {1, 1e4}: at eta 1 the direction stays within cosine
                                           0.99999 of SAM's on this problem (gradient entries are about
                                           1e-3 to 1e-1), at 1e4 it turns to cosine 0.75 to 0.87; scale 1
    GCSAM        2 F, 2 B                  gradient centralized ascent; scale 1
    MultiStepSAM 3 F, 3 B                  MultiStepSAM, ascent_steps 2; step_size in {0.5, 1} (relative
                                           to rho: 0.5 = 1/n, the default, the two steps add up to at
                                           most rho; 1: each step rho, projected back on the rho-ball);
                                           scale 1
    MicroBatchSAM 8 F, 8 B                 SAM's micro_batch_step over k = 4 micro-batches of 16 (each
                                           its own ascent, m-sharpness); 2k passes of a quarter batch:
                                           2 F, 2 B in batches of work; scale 1
    SparseSAM-F  2 F, 2 B                  SparseSAM, criterion "fisher" (SSAM-F), mask every 15 steps
                                           (one epoch) from the squared gradients of the last 8;
                                           sparsity in {0.5, 0.9} (0.5 the class's default); scale 1
    SparseSAM-D  2 F, 2 B                  SparseSAM, criterion "dynamic" (SSAM-D), mask every 15 steps,
                                           drop rate 0.5 decayed by a cosine over the run; sparsity in
                                           {0.5, 0.9}; scale 1
    BSAM         2 F, 2 B                  BayesianSAM, standalone (not over SGD): N = the trained-on
                                           images, betas (0.9, 0.999), damping 0.1 (the official CIFAR-10
                                           run's), weight decay (prior precision delta) 5e-4 as the
                                           others'; its own peak lr in {0.2, 0.5} (0.5 the official
                                           run's) on the same cosine; scale 1 (see below)
    AdamW        1 F, 1 B                  torch.optim.AdamW, betas (0.9, 0.999), weight decay 0.01
                                           (torch's default; decoupled, so times the lr); no radius; its
                                           own peak lr in {1e-3, 3e-3} on the same cosine: the baseline
                                           that MSAM-AdamW is read against
    MSAM-AdamW   1 F, 1 B                  MomentumSAM over AdamW (perturbs along AdamW's first moment
                                           exp_avg), AdamW's settings above; its own peak lr in {1e-3,
                                           3e-3} on the same cosine; scale 6, as MSAM's

The scales put each grid around the variant's best radius: ASAM's and MSAM's follow their usual radii
(0.5 and 0.3 against SAM's 0.05); the four that perturb on only some steps (interval, randomized, late,
AE-SAM) tolerate larger radii, and an exploratory quick run scored on the validation split only found
their best at the top of the scale-1 grid, hence scale 3 (fewer, larger perturbations). In that run
plain SAM peaked at 0.3 to 0.4 and fell to chance from 0.9 on (20 epochs). bSAM's ascent is rho g / s,
not normalized, so its radius has its own scale. In an exploratory quick run (validation split only)
its radii 0.001 to 0.1, the official 0.01 among them, scored alike at lr 0.2 (56.6 to 56.9%) and within
2 points at lr 0.5 (52.2 to 54.2%); 0.3 and 1 scored 55.2 to 57.9%, 3 and more 44% and less; its lr
mattered more (0.02 to 1 at rho 0.001: 39% to 57%, best at 0.2, then 0.5), hence scale 1 and lr in
{0.2, 0.5}. bSAM is read at its mean w (no averaging over posterior samples).

MSAM-AdamW's perturbation is normalized (rho m / ||m||), so its radius is MSAM's whatever the base
optimizer's step size: its grid is MSAM's. Its base optimizer is not SGD, so its accuracy mixes the
perturbation's effect with AdamW's own; plain AdamW, swept over the same two lrs, is the row that tells
them apart (its "gain kept" is still relative to SGD and SAM, as every row's). Both Momentum SAM rows are
read inside ``optimizer.unperturbed()``, at w.

The table shows the passes as measured with module hooks on the model (a forward pre-hook counts
forwards, a forward hook that hooks the output's gradient counts backwards; evaluation is not counted),
never the model above, and the backward passes in batches of work (the samples through them over the
batch size); the figure plots the latter. "gain kept" is (acc - acc_SGD) / (acc_SAM - acc_SGD) of the
test means (given where SAM beats SGD).

    python -m benchmarks.generalization [--full] [--models mlp cnn] [--epochs E] [--sweep-seeds S]
        [--seeds N] [--optimizers NAME ...] [--rho NAME=R1,R2,...] [--param NAME=V1,V2,...] [--threads 1]

prints a markdown table and writes benchmarks/results/generalization.json (every setting's validation
scores too) and docs/generalization.png.
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
    GCSAM,
    GSAM,
    SAM,
    WSAM,
    BayesianSAM,
    FisherSAM,
    FriendlySAM,
    Interval,
    LatePhase,
    LookSAM,
    MomentumSAM,
    MultiStepSAM,
    ProportionalRho,
    Randomized,
    SparseSAM,
    VaSSO,
    sample_losses_closure,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "generalization.json"
DEFAULT_FIGURE = ROOT / "docs" / "generalization.png"

#: The split: test, validation and trained-on images (all 1797 of digits); the tests shrink FIT_SIZE.
TEST_SIZE, VAL_SIZE, FIT_SIZE, SPLIT_SEED = 500, 297, 1000, 0
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 64, 0.05, 0.9, 5e-4
NOISE = 0.4
K, P, LATE_START, ALPHA, BETA, GAMMA = 5, 0.5, 0.5, 0.7, 0.6, 0.5
#: Multi-step SAM's ascent steps; micro-batch SAM's micro-batches per step; Sparse SAM's steps between mask
#: refreshes (one epoch of the quick run); bSAM's betas and damping (the official CIFAR-10 run's).
ASCENT_STEPS, MICRO_BATCHES, SPARSE_EVERY = 2, 4, 15
BSAM_BETAS, BSAM_DAMPING = (0.9, 0.999), 0.1
#: bSAM's radius scale and peak learning rates (see the module docstring).
BSAM_RHO_SCALE, BSAM_LRS = 1.0, (0.2, 0.5)
#: AdamW's and Momentum SAM over AdamW's betas, (decoupled) weight decay and swept peak lrs; MSAM's radius
#: scale, which MSAM-AdamW shares.
ADAMW_BETAS, ADAMW_WEIGHT_DECAY, ADAMW_LRS = (0.9, 0.999), 0.01, (1e-3, 3e-3)
MSAM_RHO_SCALE = 6.0
MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Scale:
    """How large a run is: the quick default or ``--full``."""

    models: tuple[str, ...]
    rho_grid: tuple[float, ...]
    epochs: int
    sweep_seeds: int
    seeds: int


QUICK = Scale(("mlp",), (0.1, 0.3, 0.9), epochs=20, sweep_seeds=1, seeds=3)
FULL = Scale(MODELS, (0.05, 0.1, 0.2, 0.4, 0.8, 1.6), epochs=40, sweep_seeds=2, seeds=5)


@dataclass(frozen=True)
class Variant:
    """One row of the table: its fixed settings (as shown), the factor on the base radius grid (None: no
    radius), and the swept hyper-parameter with its values (where it has one). ``micro_batches``: the
    micro-batches each step's batch is split into (micro-batch SAM); ``own_lr``: the swept
    hyper-parameter is the peak lr of the shared cosine schedule (bSAM, AdamW and MSAM-AdamW, which are
    not over SGD)."""

    settings: str = ""
    rho_scale: float | None = 1.0
    param: str | None = None
    values: tuple[float, ...] = ()
    micro_batches: int = 1
    own_lr: bool = False


VARIANTS: dict[str, Variant] = {
    "SGD": Variant(rho_scale=None),
    "SAM": Variant(),
    "ASAM": Variant("adaptive", 10.0),
    "SSAM": Variant("renormalized, unnormalized ascent"),
    "ESAM": Variant(f"beta={BETA}, gamma={GAMMA}"),
    "IntervalSAM": Variant(f"Interval(k={K})", 3.0),
    "RandomSAM": Variant(f"Randomized(p={P})", 3.0),
    "LateSAM": Variant(f"LatePhase(start={LATE_START})", 3.0),
    "AE-SAM": Variant("AESAM()", 3.0),
    "LookSAM": Variant(f"k={K}, alpha={ALPHA}"),
    "MSAM": Variant("MomentumSAM", MSAM_RHO_SCALE),
    "GSAM": Variant("rho proportional to lr", param="alpha", values=(0.1, 0.3)),
    "WSAM": Variant("decoupled", param="gamma", values=(0.8, 0.9)),
    "FriendlySAM": Variant("sigma=1", param="lambd", values=(0.6, 0.95)),
    "VaSSO": Variant(param="theta", values=(0.4, 0.9)),
    "FisherSAM": Variant(param="eta", values=(1.0, 1e4)),
    "GCSAM": Variant("centralized ascent"),
    "MultiStepSAM": Variant(f"ascent_steps={ASCENT_STEPS}", param="step_size", values=(0.5, 1.0)),
    "MicroBatchSAM": Variant(f"k={MICRO_BATCHES} micro-batches of {BATCH // MICRO_BATCHES}",
                             micro_batches=MICRO_BATCHES),
    "SparseSAM-F": Variant(f"fisher, mask every {SPARSE_EVERY} steps", param="sparsity", values=(0.5, 0.9)),
    "SparseSAM-D": Variant(f"dynamic, mask every {SPARSE_EVERY} steps", param="sparsity", values=(0.5, 0.9)),
    "BSAM": Variant(f"BayesianSAM, damping={BSAM_DAMPING}", BSAM_RHO_SCALE, param="lr",
                    values=BSAM_LRS, own_lr=True),
    "AdamW": Variant(f"weight_decay={ADAMW_WEIGHT_DECAY}", None, param="lr", values=ADAMW_LRS, own_lr=True),
    "MSAM-AdamW": Variant(f"MomentumSAM over AdamW, weight_decay={ADAMW_WEIGHT_DECAY}", MSAM_RHO_SCALE,
                          param="lr", values=ADAMW_LRS, own_lr=True),
}
OPTIMIZERS = tuple(VARIANTS)

#: One point of a variant's grid: (rho, hyper-parameter value), either None where it has none.
Setting = tuple[float | None, float | None]


def grid(name: str, rho_grid: tuple[float, ...], rhos: tuple[float, ...] | None = None,
         values: tuple[float, ...] | None = None) -> list[Setting]:
    """The settings swept for ``name``: its radii (``rhos``, else its scale times ``rho_grid``) times its
    hyper-parameter's values (``values``, else its own), radius-major in ascending order."""
    variant = VARIANTS[name]
    if variant.rho_scale is None:
        radii: list[float | None] = [None]
    else:
        radii = sorted(rhos if rhos is not None else (round(variant.rho_scale * r, 10) for r in rho_grid))
    params: list[float | None] = list(values if values is not None else variant.values) or [None]
    return [(rho, value) for rho in radii for value in params]


# ------------------------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The training images only: the part trained on (``fit_y``: noisy labels; ``noisy`` marks the
    flipped ones) and the validation part carved from them (``val_y``: noisy labels too). All the sweep
    sees."""

    fit_x: torch.Tensor
    fit_y: torch.Tensor
    noisy: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


@dataclass
class Data:
    """A seed's training data and the clean test split, which only the report reads."""

    training: TrainingData
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Split:
    """The fixed split of digits: (features, clean labels) of each part."""

    fit: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_split() -> Split:
    """The fixed fit/validation/test split of digits, standardized with the fit part's statistics."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, val = order[:TEST_SIZE], order[TEST_SIZE:TEST_SIZE + VAL_SIZE]
    fit = order[TEST_SIZE + VAL_SIZE:TEST_SIZE + VAL_SIZE + FIT_SIZE]
    mean, std = x[fit].mean(0), x[fit].std(0)
    # NOTE (constant pixels): some border pixels are 0 in every training image; dividing by 1 leaves
    # them at 0 instead of dividing by zero.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return Split(*(((x[part] - mean) / std, y[part]) for part in (fit, val, test)))


def flip_labels(labels: torch.Tensor, fraction: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` with ``round(fraction * n)`` of them moved to a uniformly drawn other class, and the
    mask of the moved ones."""
    count = round(fraction * len(labels))
    flipped = torch.randperm(len(labels), generator=generator)[:count]
    # NOTE (symmetric noise): adding 1..9 modulo 10 reaches each of the other nine classes equally often.
    shift = torch.randint(1, 10, (count,), generator=generator)
    noisy_y = labels.clone()
    noisy_y[flipped] = (labels[flipped] + shift) % 10
    noisy = torch.zeros(len(labels), dtype=torch.bool)
    noisy[flipped] = True
    return noisy_y, noisy


def with_label_noise(split: Split, fraction: float, seed: int) -> Data:
    """Seed ``seed``'s data: the fit and validation labels with symmetric noise, the test labels clean."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    fit_y, noisy = flip_labels(split.fit[1], fraction, generator)
    val_y, _ = flip_labels(split.val[1], fraction, generator)
    return Data(TrainingData(split.fit[0], fit_y, noisy, split.val[0], val_y), *split.test)


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


def make_optimizer(name: str, params, *, rho: float | None, param: float | None, lr: float,
                   total_steps: int, seed: int, backend: str | None,
                   num_data: int = FIT_SIZE) -> torch.optim.Optimizer:
    """Optimizer ``name`` (a key of ``VARIANTS``) over SGD with the shared lr, momentum and weight decay;
    ``param`` is the value of its swept hyper-parameter (None where it has none). bSAM is not over SGD: its
    lr is ``param``, its weight decay (the prior precision delta) the shared 5e-4, ``num_data`` its N.
    AdamW and MSAM-AdamW (Momentum SAM over AdamW) are not over SGD either: their lr is ``param``, their
    betas and decoupled weight decay AdamW's (``ADAMW_BETAS``, ``ADAMW_WEIGHT_DECAY``)."""
    sgd = torch.optim.SGD
    base = {"lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
    sam = {"rho": rho, "backend": backend, "seed": seed, **base}
    adamw = {"lr": param, "betas": ADAMW_BETAS, "weight_decay": ADAMW_WEIGHT_DECAY}
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
        "GSAM": lambda: GSAM(params, sgd, alpha=param, **sam),
        "WSAM": lambda: WSAM(params, sgd, gamma=param, **sam),
        "FriendlySAM": lambda: FriendlySAM(params, sgd, lambd=param, **sam),
        "VaSSO": lambda: VaSSO(params, sgd, theta=param, **sam),
        "FisherSAM": lambda: FisherSAM(params, sgd, eta=param, **sam),
        "GCSAM": lambda: GCSAM(params, sgd, **sam),
        "MultiStepSAM": lambda: MultiStepSAM(params, sgd, ascent_steps=ASCENT_STEPS, step_size=param, **sam),
        "MicroBatchSAM": lambda: SAM(params, sgd, **sam),
        "SparseSAM-F": lambda: SparseSAM(params, sgd, sparsity=param, update_every=SPARSE_EVERY,
                                         criterion="fisher", **sam),
        "SparseSAM-D": lambda: SparseSAM(params, sgd, sparsity=param, update_every=SPARSE_EVERY,
                                         criterion="dynamic", total_steps=total_steps, **sam),
        "BSAM": lambda: BayesianSAM(params, num_data=num_data, lr=param, rho=rho, betas=BSAM_BETAS,
                                    weight_decay=WEIGHT_DECAY, damping=BSAM_DAMPING, seed=seed,
                                    backend=backend),
        "AdamW": lambda: torch.optim.AdamW(params, **adamw),
        "MSAM-AdamW": lambda: MomentumSAM(params, rho=rho, base_optimizer=torch.optim.AdamW, backend=backend,
                                          seed=seed, **adamw),
    }
    if name not in builders:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    return builders[name]()


def make_rho_schedule(name: str, optimizer: torch.optim.Optimizer, rho: float | None,
                      lr: float) -> ProportionalRho | None:
    """GSAM's radius follows the lr (rho at the peak lr ``lr``, 0 at lr 0); the others keep theirs."""
    if name != "GSAM":
        return None
    return ProportionalRho(optimizer, rho_max=rho, rho_min=0.0, lr_max=lr, lr_min=0.0)


def expected_passes(name: str, total_steps: int) -> tuple[float, float] | None:
    """(forward, backward) passes per step of the compute model over ``total_steps`` steps, counted as the
    hooks count them (a micro-batch's pass is one pass); None where it depends on the data (AE-SAM) or on
    random draws (RandomSAM)."""
    sam_steps = {"IntervalSAM": math.ceil(total_steps / K), "LookSAM": math.ceil(total_steps / K),
                 "LateSAM": total_steps - math.ceil(LATE_START * total_steps)}
    if name in ("SGD", "MSAM", "AdamW", "MSAM-AdamW"):
        return 1.0, 1.0
    if name == "ESAM":
        return (3.0 if GAMMA < 1 else 2.0), 2.0
    if name in sam_steps:
        passes = 1.0 + sam_steps[name] / total_steps
        return passes, passes
    if name in ("RandomSAM", "AE-SAM"):
        return None
    if name == "MultiStepSAM":
        return 1.0 + ASCENT_STEPS, 1.0 + ASCENT_STEPS
    micro_batches = VARIANTS[name].micro_batches
    return 2.0 * micro_batches, 2.0 * micro_batches


# --------------------------------------------------------------------------------------- training


def cosine_lr(lr: float, step: int, total_steps: int) -> float:
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))


@dataclass
class Run:
    """One optimizer at one setting training one model of one seed."""

    name: str
    setting: Setting
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rho_schedule: ProportionalRho | None
    counter: PassCounter
    order: torch.Generator
    lr: float
    total_steps: int
    steps: int = 0
    epoch_seconds: list[float] = field(default_factory=list)

    def train_epoch(self, data: TrainingData) -> None:
        """One epoch of minibatch steps on the fit part (the partial batch dropped), timed."""
        loss_fn = nn.CrossEntropyLoss()
        sample_loss_fn = nn.CrossEntropyLoss(reduction="none")
        model, optimizer = self.model, self.optimizer
        started = time.perf_counter()
        order = torch.randperm(len(data.fit_y), generator=self.order)
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            x, y = data.fit_x[batch], data.fit_y[batch]
            # NOTE (one schedule): the lr is set per step from the same cosine for every optimizer
            # (MSAM's param groups are its SGD's or AdamW's, so this also sets its step size; bSAM's,
            # AdamW's and MSAM-AdamW's peak is their own); GSAM's radius follows it, set after it as after
            # an LR scheduler.
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(self.lr, self.steps, self.total_steps)
            if self.rho_schedule is not None:
                self.rho_schedule.step()
            micro_batches = VARIANTS[self.name].micro_batches
            if isinstance(optimizer, ESAM):
                optimizer.sds_step(sample_losses_closure(model, x, y, sample_loss_fn))
            elif micro_batches > 1:
                # NOTE (micro-batch SAM): each micro-batch's loss scaled by 1/k, so that the descent is on
                # the mean of their SAM gradients; the closure must not zero the gradients.
                def micro_closure(batch: tuple[torch.Tensor, torch.Tensor], k=micro_batches) -> torch.Tensor:
                    loss = loss_fn(model(batch[0]), batch[1]) / k
                    loss.backward()
                    return loss

                optimizer.zero_grad(set_to_none=True)
                optimizer.micro_batch_step(micro_closure, zip(x.chunk(micro_batches), y.chunk(micro_batches)))
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
        # NOTE (MSAM, MSAM-AdamW): between steps the weights sit at w - rho v / ||v|| (v: SGD's momentum
        # buffer or AdamW's first moment); the model is w.
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


def train_runs(kind: str, settings: list[tuple[str, Setting]], data: TrainingData, *, seed: int, epochs: int,
               lr: float, backend: str | None, progress: Progress) -> list[Run]:
    """Train every (optimizer, setting) of ``settings`` on model ``kind`` from one initialization,
    interleaved by epoch, on the fit part of ``data``."""
    total_steps = epochs * (len(data.fit_y) // BATCH)
    torch.manual_seed(seed)
    initial = make_model(kind)
    runs = []
    for name, setting in settings:
        rho, param = setting
        model = copy.deepcopy(initial)
        optimizer = make_optimizer(name, model.parameters(), rho=rho, param=param, lr=lr,
                                   total_steps=total_steps, seed=seed, backend=backend,
                                   num_data=len(data.fit_y))
        peak = param if VARIANTS[name].own_lr else lr
        runs.append(Run(name, setting, model, optimizer, make_rho_schedule(name, optimizer, rho, lr),
                        PassCounter(model), torch.Generator().manual_seed(20_000 + seed), peak, total_steps))
    for epoch in range(epochs):
        # NOTE (interleaving): each epoch starts with the next run, so no run always goes first (cold
        # caches) or last; results do not depend on the order (no global RNG is used).
        shift = epoch % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.train_epoch(data)
            progress.update(f"seed {seed} {kind} {run.name}")
    return runs


def sweep(kind: str, grids: dict[str, list[Setting]], data: TrainingData, *, seed: int, epochs: int,
          lr: float, backend: str | None, progress: Progress) -> dict[str, dict[Setting, float]]:
    """Validation accuracy of every setting in ``grids`` (per optimizer) on model ``kind``, seed ``seed``.

    NOTE (no test data): it is handed the training data only, so neither the choice nor anything it is
    based on can read the test split."""
    settings = [(name, setting) for name, points in grids.items() for setting in points]
    runs = train_runs(kind, settings, data, seed=seed, epochs=epochs, lr=lr, backend=backend,
                      progress=progress)
    scores: dict[str, dict[Setting, float]] = {name: {} for name in grids}
    for run in runs:
        scores[run.name][run.setting] = run.accuracy(data.val_x, data.val_y)
    return scores


def choose(scores: dict[Setting, list[float]]) -> Setting:
    """The setting with the highest mean validation accuracy over the sweep seeds; among equal means the
    first in grid order (the smaller radius)."""
    means = {setting: statistics.fmean(values) for setting, values in scores.items()}
    best = max(means.values())
    return next(setting for setting, mean in means.items() if mean == best)


def report(kind: str, chosen: dict[str, Setting], data: Data, *, seed: int, epochs: int, lr: float,
           backend: str | None, progress: Progress) -> dict[str, dict]:
    """Train each optimizer at its chosen setting on seed ``seed`` and read it on every split."""
    training = data.training
    runs = train_runs(kind, list(chosen.items()), training, seed=seed, epochs=epochs, lr=lr,
                      backend=backend, progress=progress)
    results = {}
    for run in runs:
        counter = run.counter
        results[run.name] = {
            "validation_accuracy": run.accuracy(training.val_x, training.val_y),
            "test_accuracy": run.accuracy(data.test_x, data.test_y),
            "train_accuracy_noisy_labels": run.accuracy(training.fit_x, training.fit_y),
            "noisy_labels_fit": run.accuracy(training.fit_x[training.noisy], training.fit_y[training.noisy]),
            "steps": run.steps,
            "forward_passes_per_step": counter.forward / run.steps,
            "backward_passes_per_step": counter.backward / run.steps,
            "forward_batches_per_step": counter.forward_samples / (run.steps * BATCH),
            "backward_batches_per_step": counter.backward_samples / (run.steps * BATCH),
            "epoch_seconds": sum(run.epoch_seconds) / len(run.epoch_seconds),
        }
    return results


# ---------------------------------------------------------------------------------------- summary


def grid_edge(rho: float | None, points: list[Setting]) -> str | None:
    """"lowest" or "highest" where ``rho`` is at that end of a grid of several radii, else None."""
    radii = sorted({point[0] for point in points if point[0] is not None})
    if rho is None or len(radii) < 2:
        return None
    return "lowest" if rho == radii[0] else "highest" if rho == radii[-1] else None


def summarize(per_seed: list[dict[str, dict]], chosen: dict[str, Setting],
              scores: dict[str, dict[Setting, list[float]]], grids: dict[str, list[Setting]],
              total_steps: int) -> dict[str, dict]:
    """Per optimizer: the chosen setting and the sweep behind it, then the report's means and spreads over
    the seeds, the compute model, and the gain kept."""
    summary = {}
    for name, (rho, value) in chosen.items():
        variant = VARIANTS[name]
        rows = [seed_results[name] for seed_results in per_seed]
        accuracy = [row["test_accuracy"] for row in rows]
        entry = {
            "rho": rho, "param": variant.param, "param_value": value, "settings": variant.settings,
            "rho_at_grid_edge": grid_edge(rho, grids[name]),
            "validation_accuracy": statistics.fmean(scores[name][(rho, value)]),
            "sweep": [{"rho": r, "param_value": v, "validation_accuracy": values,
                       "validation_accuracy_mean": statistics.fmean(values)}
                      for (r, v), values in scores[name].items()],
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
        # NOTE: the report seeds' own validation accuracy, beside the sweep's score that chose the setting.
        entry["report_validation_accuracy"] = statistics.fmean(row["validation_accuracy"] for row in rows)
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
    header = ("| model | optimizer | rho | swept | settings | val acc (%) | test acc (%) | noise fit (%) "
              "| fwd/step | bwd/step | bwd batches/step | ms/epoch | time / SGD | gain kept |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for kind, summary in results.items():
        for name, entry in summary.items():
            rho = "" if entry["rho"] is None else f"{entry['rho']:g}"
            if entry["rho_at_grid_edge"] is not None:
                rho += f" ({entry['rho_at_grid_edge']})"
            swept = "" if entry["param"] is None else f"{entry['param']}={entry['param_value']:g}"
            kept = "" if entry["gain_kept"] is None else f"{entry['gain_kept']:.2f}"
            ratio = f"{entry['time_vs_sgd']:.2f}" if "time_vs_sgd" in entry else ""
            lines.append(
                f"| {kind} | {name} | {rho} | {swept} | {entry['settings']} | "
                f"{100 * entry['validation_accuracy']:.1f} | "
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
    """Accuracy against measured backward passes per step (in minibatches of work); False (with a note)
    without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed; no figure written", file=sys.stderr)
        return False
    names = list(next(iter(results.values())))
    markers = "osD^v<>pPX*h"
    colors = [f"C{i}" for i in range(10)] + ["black", "olive", "teal", "maroon", "navy", "gold", "magenta",
                                             "lime", "sienna", "slategray", "crimson", "darkcyan"]
    figure = Figure(figsize=(6 * len(results), 5), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, (kind, summary) in zip(axes, results.items()):
        # NOTE (batches of work): a micro-batch's pass counts as its share of a minibatch, so that
        # micro-batch SAM sits at its cost, 2, not at its 2k passes (ESAM at its 1.5).
        points = [(summary[name]["backward_batches_per_step"], 100 * summary[name]["test_accuracy_mean"])
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
        ax.set_xlim(0.9, max(2.0, max(x for x, _ in points)) + 0.35)
        ax.set_xlabel("backward passes per step, in minibatches of work (measured)")
        ax.set_ylabel("clean test accuracy (%), mean ± std over seeds")
        ax.set_title(f"{kind} (dotted: SGD, dashed: SAM)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(f"digits, {subtitle}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    return True


def _subtitle(noise: float, seeds: int, epochs: int) -> str:
    return (f"{noise:.0%} label noise, {seeds} seed(s), {epochs} epochs;\n"
            "each setting chosen on the validation split")


def _describe(scale: Scale) -> str:
    radii = ", ".join(f"{r:g}" for r in scale.rho_grid)
    return (f"models {' '.join(scale.models)}, base radius grid {radii}, {scale.epochs} epochs, "
            f"{scale.sweep_seeds} sweep seed(s), {scale.seeds} report seeds")


def _parse_values(items: list[str], flag: str, allowed: list[str]) -> dict[str, tuple[float, ...]]:
    """``NAME=V1,V2,...`` items as {NAME: (V1, V2, ...)}."""
    parsed = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            numbers = tuple(float(value) for value in values.split(","))
        except ValueError:
            numbers = ()
        if name not in allowed or not numbers:
            raise SystemExit(f"{flag}: expected NAME=V1,V2,... with NAME one of {allowed}, got {item!r}")
        parsed[name] = numbers
    return parsed


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it writes to the JSON file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generalization",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--full", action="store_true", help=f"the larger run: {_describe(FULL)} (default: "
                                                            f"{_describe(QUICK)})")
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS,
                        help="models (default: the setting's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the setting's)")
    parser.add_argument("--sweep-seeds", type=int, default=None,
                        help="seeds 0..S-1 score the grid on the validation split (default: the setting's)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="report seeds S..S+N-1 run the chosen settings (default: the setting's)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS,
                        metavar="NAME", help=f"subset of {', '.join(OPTIMIZERS)}")
    with_rho = [name for name, variant in VARIANTS.items() if variant.rho_scale is not None]
    with_param = [name for name, variant in VARIANTS.items() if variant.param is not None]
    parser.add_argument("--rho", action="append", default=[], metavar="NAME=R1,R2,...",
                        help="replace one optimizer's radius grid (repeatable)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                        help=f"replace the swept hyper-parameter's values of one of {', '.join(with_param)}")
    parser.add_argument("--lr", type=float, default=LR,
                        help="peak lr of the cosine schedule (all but BSAM, AdamW and MSAM-AdamW, whose "
                             "peak lr is swept)")
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
    scale = FULL if args.full else QUICK
    models = args.models or list(scale.models)
    epochs = scale.epochs if args.epochs is None else args.epochs
    sweep_seeds = scale.sweep_seeds if args.sweep_seeds is None else args.sweep_seeds
    seeds = scale.seeds if args.seeds is None else args.seeds
    if min(epochs, sweep_seeds, seeds) < 1:
        parser.error("--epochs, --sweep-seeds and --seeds must be at least 1")
    rhos = _parse_values(args.rho, "--rho", with_rho)
    values = _parse_values(args.param, "--param", with_param)
    backend = None if args.backend == "auto" else args.backend
    names = [name for name in OPTIMIZERS if name in args.optimizers]
    grids = {name: grid(name, scale.rho_grid, rhos.get(name), values.get(name)) for name in names}
    torch.set_num_threads(args.threads)
    backend_name, backend_reason = backends.resolve(torch.device("cpu"), backend)

    started = time.perf_counter()
    split = load_split()
    steps_per_epoch = FIT_SIZE // BATCH
    total_steps = epochs * steps_per_epoch
    sweep_range, report_range = range(sweep_seeds), range(sweep_seeds, sweep_seeds + seeds)
    settings = sum(len(points) for points in grids.values())
    print(f"digits: {FIT_SIZE} trained on + {VAL_SIZE} validation ({args.noise:.0%} noisy labels) / "
          f"{TEST_SIZE} test; {epochs} epochs x {steps_per_epoch} steps of {BATCH}; lr {args.lr:g} cosine; "
          f"{settings} settings x {sweep_seeds} sweep seed(s), then {len(names)} chosen x {seeds} report "
          f"seed(s); backend {backend_name}; {args.threads} thread(s)", flush=True)
    progress = Progress(len(models) * epochs * (sweep_seeds * settings + seeds * len(names)),
                        enabled=not args.no_progress)
    train = {"epochs": epochs, "lr": args.lr, "backend": backend, "progress": progress}
    results = {}
    for kind in models:
        scores: dict[str, dict[Setting, list[float]]] = {name: {p: [] for p in grids[name]} for name in names}
        for seed in sweep_range:
            training = with_label_noise(split, args.noise, seed).training
            for name, by_setting in sweep(kind, grids, training, seed=seed, **train).items():
                for setting, accuracy in by_setting.items():
                    scores[name][setting].append(accuracy)
        chosen = {name: choose(scores[name]) for name in names}
        per_seed = [report(kind, chosen, with_label_noise(split, args.noise, seed), seed=seed, **train)
                    for seed in report_range]
        results[kind] = summarize(per_seed, chosen, scores, grids, total_steps)
    progress.close()
    elapsed = time.perf_counter() - started

    table = markdown_table(results)
    print("\n" + table + "\n")
    for kind, summary in results.items():
        if "SGD" in summary and "SAM" in summary:
            gap = 100 * (summary["SAM"]["test_accuracy_mean"] - summary["SGD"]["test_accuracy_mean"])
            print(f"{kind}: SAM - SGD = {gap:+.1f} points (gain kept is relative to this)")
    config = {"full": args.full, "seeds": seeds, "sweep_seeds": sweep_seeds,
              "report_seeds": list(report_range), "epochs": epochs,
              "steps_per_epoch": steps_per_epoch, "batch": BATCH, "lr": args.lr,
              "lr_schedule": "cosine per step to 0", "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
              "adamw": {"betas": list(ADAMW_BETAS), "weight_decay": ADAMW_WEIGHT_DECAY},
              "label_noise": args.noise, "fit_size": FIT_SIZE, "validation_size": VAL_SIZE,
              "test_size": TEST_SIZE, "split_seed": SPLIT_SEED,
              "grids": {name: [list(point) for point in points] for name, points in grids.items()},
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
