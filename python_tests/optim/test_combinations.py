"""Every combination of the option table (sam_kernels/optim/combinations.py): variant x base optimizer x
path x capturable x schedule x AMP either runs with the trajectory of the eager reference of
eager_reference.py, or is refused with the table's message."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
import torch
from eager_reference import (
    AESAMRule,
    EagerAdamMSAM,
    EagerLookSAM,
    EagerMSAM,
    ReferenceSAM,
    batch_loss,
    global_norm,
    make_batches,
    make_mlp,
)
from sparse_sam_reference import EagerSparseSAM
from tolerance import assert_close
from variant_reference import SETTINGS, EagerMultiStepSAM

from sam_kernels.optim import (
    AESAM,
    ESAM,
    GCSAM,
    GSAM,
    SAM,
    WSAM,
    FisherSAM,
    FriendlySAM,
    Interval,
    LookSAM,
    MomentumSAM,
    MultiStepSAM,
    SparseSAM,
    VaSSO,
    combinations,
)

STEPS = 3
SEED = 1234
#: The loss scale of the AMP runs: a power of two, so unscaling is exact in fp32 and the runs follow the
#: reference without a scale.
SCALE = 2.0**10

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "adam": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
    "other": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
}
PATHS = {"auto": {}, "fused": {"fused": True}, "generic": {"fused": False}, "foreach": {"foreach": True},
         "fused+foreach": {"fused": True, "foreach": True}}
#: name: (package schedule, reference decision of step t from the first gradient's squared norm s)
SCHEDULES = {
    "none": (lambda: None, lambda: (lambda t, s: True)),
    "host": (lambda: Interval(2), lambda: (lambda t, s: t % 2 == 0)),
    "after-backward": (lambda: AESAM(STEPS), lambda: AESAMRule(STEPS)),
}
#: Options of the two-pass variants on SAM's engine: (class, options, reference options)
TWO_PASS = {
    "SAM": (SAM, {"rho": 0.05}, {}),
    "ASAM": (SAM, {"rho": 0.5, "adaptive": True, "adaptive_eta": 0.01}, {"adaptive": True, "eta": 0.01}),
    "USAM": (SAM, {"rho": 0.02, "normalize_ascent": False}, {"normalize": False}),
    "SSAM": (SAM, {"rho": 0.05, "renormalize": True}, {"renormalize": True}),
    "ESAM": (ESAM, {"rho": 0.05, "beta": 0.6, "gamma": 1.0}, {}),
}
#: The SAM family's variants: (class, key of their settings in variant_reference.SETTINGS)
FAMILY = {"GSAM": (GSAM, "gsam"), "WSAM": (WSAM, "wsam"), "FriendlySAM": (FriendlySAM, "friendly"),
          "VaSSO": (VaSSO, "vasso"), "FisherSAM": (FisherSAM, "fisher"), "GCSAM": (GCSAM, "gcsam")}
#: Sparse SAM's options: refreshes at steps 0 and 2 of the three steps.
SPARSE = {"rho": 0.1, "sparsity": 0.4, "update_every": 2, "criterion": "fisher", "fisher_batches": 2}
#: MultiStepSAM's: two long steps, so the projection acts.
MULTI_STEP = {"rho": 0.05, "ascent_steps": 2, "step_size": 0.8}
assert (set(TWO_PASS) | set(FAMILY) | {"LookSAM", "MomentumSAM", "SparseSAM", "MultiStepSAM"}
        == set(combinations.VARIANTS))
assert set(BASES) == set(combinations.BASES) and set(PATHS) == set(combinations.PATHS)
assert set(SCHEDULES) == set(combinations.SCHEDULES)


def build(variant: str, base: str, path: str, capturable: bool, schedule):
    """The optimizer of a combination over a fresh model; returns (model, optimizer)."""
    model = make_mlp()
    cls, options = BASES[base]
    common = {**PATHS[path], "capturable": capturable, "seed": SEED}
    if schedule is not None:
        common["schedule"] = schedule
    if variant == "MomentumSAM":
        return model, MomentumSAM(model.parameters(), rho=0.3, base_optimizer=cls, **options, **common)
    if variant == "LookSAM":
        return model, LookSAM(model.parameters(), cls, rho=0.05, k=2, alpha=0.7, **options, **common)
    if variant == "SparseSAM":
        return model, SparseSAM(model.parameters(), cls, **SPARSE, **options, **common)
    if variant == "MultiStepSAM":
        return model, MultiStepSAM(model.parameters(), cls, **MULTI_STEP, **options, **common)
    if variant in FAMILY:
        variant_cls, key = FAMILY[variant]
        return model, variant_cls(model.parameters(), cls, **SETTINGS[key][1], **options, **common)
    variant_cls, variant_options, _ = TWO_PASS[variant]
    return model, variant_cls(model.parameters(), cls, **variant_options, **options, **common)


def train(optimizer, model, batches, scaler, kept_log: list) -> None:
    """The two-call loop (one pass per step for MomentumSAM), under ``scaler`` when given."""
    for x, y in batches:
        optimizer.zero_grad()
        if isinstance(optimizer, ESAM):
            kept_log.append({i for i, p in enumerate(model.parameters())
                             if not any(p is d for d in optimizer.dropped_tensors)})
        loss = batch_loss(model, x, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if isinstance(optimizer, MomentumSAM):
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
            continue
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        for _ in range(optimizer.policy.ascent_steps - 1):  # MultiStepSAM's further ascent steps
            loss = batch_loss(model, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        if optimizer.needs_second_pass():
            loss = batch_loss(model, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.second_step(zero_grad=True)


def reference(variant: str, base: str, schedule: str, batches, kept_log: list) -> torch.nn.Module:
    """The eager run of a combination that runs (the path, capturable and AMP do not change it)."""
    model = make_mlp()
    cls, options = BASES[base]
    if variant == "MomentumSAM":
        eager = (EagerMSAM(model, rho=0.3, **options) if base == "sgd"
                 else EagerAdamMSAM(model, cls, rho=0.3, **options))
        for x, y in batches:
            eager.step(model, x, y)
        return model
    optimizer = cls(model.parameters(), **options)
    if variant in ("SparseSAM", "MultiStepSAM"):
        eager = (EagerSparseSAM(model, optimizer, **SPARSE, seed=SEED) if variant == "SparseSAM" else
                 EagerMultiStepSAM(model, optimizer, rho=0.05, steps=2, step_size=0.8))
        for x, y in batches:
            eager.step(model, x, y)
        return model
    if variant in FAMILY:
        eager_cls, eager_options = SETTINGS[FAMILY[variant][1]]
        eager = eager_cls(model, optimizer, **eager_options)
        for x, y in batches:
            eager.step(model, x, y)
        return model
    if variant == "LookSAM":
        eager = EagerLookSAM(model, optimizer, rho=0.05, k=2, alpha=0.7)
        for x, y in batches:
            eager.step(model, x, y)
        return model
    _, variant_options, reference_options = TWO_PASS[variant]
    params = list(model.parameters())
    group = {"params": params, "rho": variant_options["rho"], **reference_options}
    group.pop("normalize", None), group.pop("renormalize", None)
    eager = ReferenceSAM([group], optimizer, normalize=reference_options.get("normalize", True),
                     renormalize=reference_options.get("renormalize", False))
    decide = SCHEDULES[schedule][1]()
    for t, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        batch_loss(model, x, y).backward()
        if not decide(t, global_norm(p.grad for p in params) ** 2):
            optimizer.step()
            continue
        kept = {params[i] for i in kept_log[t]} if variant == "ESAM" else None
        eager.ascent(kept=kept, divisor=variant_options.get("beta", 1.0))
        optimizer.zero_grad()
        batch_loss(model, x, y).backward()
        eager.descent()
    return model


POINTS = list(itertools.product(combinations.BASES, combinations.PATHS, (False, True), combinations.SCHEDULES,
                                (False, True)))


def sweep(variant: str, build_run, reference_run) -> tuple[int, int]:
    """Every point of the table for ``variant``: refused ones raise the table's message, the others
    follow the eager reference. ``build_run(base, path, capturable, schedule)`` returns (model,
    optimizer); ``reference_run(base, schedule name, batches, kept_log)`` the eager run's model. A new
    variant's tests call this with its own two. Returns (refused, ran)."""
    batches = make_batches(STEPS)
    refused = ran = 0
    for base, path, capturable, schedule, amp in POINTS:
        make_schedule = SCHEDULES[schedule][0]
        point = combinations.Combination(variant, base, path, capturable, schedule, amp,
                                         base_name=BASES[base][0].__name__,
                                         schedule_name=type(make_schedule()).__name__,
                                         drops_tensors=variant == "ESAM")
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if amp else None
        row = combinations.refusal(point)
        if row is not None:
            refused += 1
            message = row.message_for(point)
            with pytest.raises(row.error, match=re.escape(message)):
                model, optimizer = build_run(base, path, capturable, make_schedule())
                train(optimizer, model, batches[:1], scaler, [])
            continue
        ran += 1
        model, optimizer = build_run(base, path, capturable, make_schedule())
        kept_log: list = []
        train(optimizer, model, batches, scaler, kept_log)
        expected = reference_run(base, schedule, batches, kept_log)
        assert_close(list(model.parameters()), list(expected.parameters()), scale=50, msg=str(point))
    return refused, ran


def test_every_combination_runs_or_is_refused_by_the_table():
    totals = [sweep(variant, functools.partial(build, variant), functools.partial(reference, variant))
              for variant in combinations.VARIANTS]
    assert all(ran for _, ran in totals) and any(refused for refused, _ in totals), totals
