"""GSAM, WSAM, Friendly-SAM, VaSSO, Fisher-SAM and GC-SAM against the eager implementations of
variant_reference.py over a few steps of the small BatchNorm model: SGD and AdamW, both calling styles,
exact resume, steps skipped for a non-finite gradient, and bad option values; GSAM under ProportionalRho
(the rho schedulers themselves: test_rho_schedulers.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from eager_reference import (
    assert_models_close,
    assert_models_equal,
    batch_loss,
    clone_model,
    closure_step,
    make_batches,
    make_model,
)
from tolerance import TOLERANCES, assert_bitwise_equal
from variant_reference import SETTINGS, EagerGSAM, poison, proportional_rho

from sam_kernels import GCSAM, GSAM, WSAM, FisherSAM, FriendlySAM, VaSSO
from sam_kernels.optim import ProportionalRho, freeze_bn_stats

STEPS = 3

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}

#: The class of each setting of variant_reference.SETTINGS (whose options both sides are built with).
CLASSES = {"gsam": GSAM, "wsam": WSAM, "wsam_coupled": WSAM, "friendly": FriendlySAM, "vasso": VaSSO,
           "fisher": FisherSAM, "gcsam": GCSAM}

#: One base optimizer per variant for the resume and non-finite tests (SGD's and AdamW's state both seen).
ONE_BASE = {"gsam": "sgd", "wsam": "adamw", "friendly": "sgd", "vasso": "adamw", "fisher": "adamw",
            "gcsam": "sgd"}


def build(name: str, model, base_name: str, backend: str):
    cls, base_options = BASES[base_name]
    return CLASSES[name](model.parameters(), cls, backend=backend, **SETTINGS[name][1], **base_options)


def build_reference(name: str, model, base_name: str):
    variant_cls, options = SETTINGS[name]
    cls, base_options = BASES[base_name]
    return variant_cls(model, cls(model.parameters(), **base_options), **options)


def two_call_step(optimizer, model, x, y) -> None:
    """The two-call loop style, BatchNorm frozen in the second pass."""
    optimizer.zero_grad()  # a closure step before this one may leave its gradients
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    with freeze_bn_stats(model):
        batch_loss(model, x, y).backward()
    optimizer.second_step(zero_grad=True)


def train(optimizer, model, batches, first: int = 0) -> None:
    """Step ``first + i`` of a run takes batch i in the two-call style when even, by closure when odd."""
    for step, (x, y) in enumerate(batches, start=first):
        (closure_step if step % 2 else two_call_step)(optimizer, model, x, y)


def assert_holds_own_state(optimizer, model, reference) -> None:
    """Each buffer of the reference (Friendly-SAM's m, VaSSO's d) is in the optimizer's state of its
    parameter, under a name of the implementation's choosing."""
    rtol, atol = TOLERANCES[torch.float32]
    for index, (p, q) in enumerate(zip(model.parameters(), reference.params, strict=True)):
        for name, value in reference.state[q].items():
            held = [v for v in optimizer.state[p].values() if torch.is_tensor(v) and v.shape == value.shape]
            assert any(torch.allclose(v.double(), value.double(), rtol=rtol, atol=atol) for v in held), \
                f"parameter {index}: no state entry holds the reference's {name}"


def assert_same(actual, expected, where: str = "state_dict") -> None:
    """Equal, bit for bit for tensors, through nested dicts and lists."""
    if torch.is_tensor(expected):
        assert torch.is_tensor(actual), where
        assert_bitwise_equal(actual, expected, where)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key, value in expected.items():
            assert_same(actual[key], value, f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected or (actual != actual and expected != expected), where


# ---------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("name", SETTINGS)
def test_variant_matches_reference(backend, name, base_name):
    """Three steps (two-call, closure, two-call) equal the reference's: weights, BatchNorm buffers and the
    variant's own buffers."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(name, model, base_name, backend)
    reference = build_reference(name, expected, base_name)
    batches = make_batches(STEPS)
    train(optimizer, model, batches)
    for x, y in batches:
        reference.step(expected, x, y)
    assert_models_close(model, expected)
    assert_holds_own_state(optimizer, model, reference)


@pytest.mark.parametrize("name", ONE_BASE)
def test_resume_equals_uninterrupted_run(backend, name):
    """Save after 2 steps, load into a fresh model and optimizer, take the third step (it reads every kind
    of state the first two left): weights, BatchNorm buffers and the whole optimizer state equal the
    uninterrupted run's bit for bit."""
    batches = make_batches(3)
    model = make_model()
    optimizer = build(name, model, ONE_BASE[name], backend)
    train(optimizer, model, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(optimizer, model, batches[2:], first=2)  # the uninterrupted run goes on
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=9)  # other weights: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    again = build(name, resumed, ONE_BASE[name], backend)
    again.load_state_dict(checkpoint["optimizer"])
    train(again, resumed, batches[2:], first=2)
    assert_models_equal(resumed, model)
    assert_same(again.state_dict(), optimizer.state_dict())


def _is_initial(entry: dict) -> bool:
    """A fresh state entry (zero tensors, zero counters), which the next step treats like an absent one;
    a fused descent may create one on a parameter's first step even when the step is skipped."""
    return all(not torch.is_tensor(value) or not value.any() for value in entry.values())


#: (pass, value) written into a gradient at each step, or None: the very first step skipped (no state
#: yet), then skips in either pass once the variant's buffers exist.
INJECTIONS = [("ascent", math.nan), None, ("descent", math.inf), ("ascent", -math.inf), None]


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("name", ONE_BASE)
def test_non_finite_gradient_skips_the_step(backend, name):
    """A NaN or inf in either pass skips the step: the weights are restored bit for bit and the state
    (the base optimizer's and the variant's own m or d) is unchanged, so the run continues like the
    reference's, which skips the same steps."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(name, model, ONE_BASE[name], backend)
    reference = build_reference(name, expected, ONE_BASE[name])
    params = list(model.parameters())
    for step, ((x, y), bad) in enumerate(zip(make_batches(len(INJECTIONS)), INJECTIONS, strict=True)):
        weights = [p.detach().clone() for p in params]
        state = copy.deepcopy(optimizer.state_dict()["state"])
        optimizer.zero_grad()
        batch_loss(model, x, y).backward()
        if bad is not None and bad[0] == "ascent":
            poison(bad[1])([p.grad for p in params])
        optimizer.first_step(zero_grad=True)
        if bad is not None and bad[0] == "ascent":
            assert_bitwise_equal([p.detach() for p in params], weights, f"step {step}: no ascent")
        with freeze_bn_stats(model):
            batch_loss(model, x, y).backward()
        if bad is not None and bad[0] == "descent":
            poison(bad[1])([p.grad for p in params])
        optimizer.second_step(zero_grad=True)
        corrupt = {} if bad is None else {f"corrupt_{bad[0]}": poison(bad[1])}
        assert reference.step(expected, x, y, **corrupt) == (bad is not None)
        if bad is None:
            continue
        assert_bitwise_equal([p.detach() for p in params], weights, f"step {step}: weights restored")
        after = optimizer.state_dict()["state"]
        for index, entry in after.items():
            if index in state:
                assert_same(entry, state[index], f"step {step}: state[{index}]")
            else:
                assert _is_initial(entry), f"step {step}: a skipped step wrote parameter {index}'s state"
        assert state.keys() <= after.keys(), f"step {step}: state entries vanished"
    assert reference.skipped == [bad is not None for bad in INJECTIONS]
    assert_models_close(model, expected)
    assert_holds_own_state(optimizer, model, reference)


# ------------------------------------------------------------------------------------- bad values


#: (class, option, value): each refused at construction with a ValueError naming the option.
BAD = [
    (GSAM, "alpha", -0.1), (GSAM, "alpha", 1.0), (GSAM, "alpha", math.nan),
    (WSAM, "gamma", -0.5), (WSAM, "gamma", 1.0), (WSAM, "gamma", math.nan),
    (FriendlySAM, "lambd", -0.1), (FriendlySAM, "lambd", 1.0), (FriendlySAM, "lambd", math.nan),
    (FriendlySAM, "sigma", -1.0), (FriendlySAM, "sigma", math.inf), (FriendlySAM, "sigma", math.nan),
    (VaSSO, "theta", 0.0), (VaSSO, "theta", 1.5), (VaSSO, "theta", math.nan),
    (FisherSAM, "eta", -1.0), (FisherSAM, "eta", math.inf), (FisherSAM, "eta", math.nan),
]


@pytest.mark.parametrize(("cls", "option", "value"), BAD,
                         ids=[f"{cls.__name__}-{option}={value}" for cls, option, value in BAD])
def test_bad_values_are_refused(cls, option, value):
    with pytest.raises(ValueError, match=rf"\b{option}\b"):
        cls(make_model().parameters(), torch.optim.SGD, lr=0.1, **{option: value})


@pytest.mark.parametrize(("cls", "options"), [
    (GSAM, {"alpha": 0.0}), (WSAM, {"gamma": 0.0}), (FriendlySAM, {"sigma": 0.0, "lambd": 0.0}),
    (VaSSO, {"theta": 1.0}), (FisherSAM, {"eta": 0.0}), (GCSAM, {}),
], ids=["GSAM", "WSAM", "FriendlySAM", "VaSSO", "FisherSAM", "GCSAM"])
def test_the_ends_of_the_ranges_are_accepted(cls, options):
    cls(make_model().parameters(), torch.optim.SGD, lr=0.1, **options)


# ----------------------------------------------------------------------------------- rho schedules


LR_MAX, LR_MIN, RHO_MAX, RHO_MIN = 0.05, 0.005, 0.1, 0.02
RHO_BOUNDS = {"rho_max": RHO_MAX, "rho_min": RHO_MIN, "lr_max": LR_MAX, "lr_min": LR_MIN}


def cosine_lr(t: int, total: int) -> float:
    return LR_MIN + (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * t / total)) / 2


def test_proportional_rho_under_a_cosine_schedule_matches_gsam_reference(backend):
    """rho follows the learning rate the LR scheduler has just set (GSAM's rule; set at construction too,
    replacing the optimizer's own rho), and GSAM under it takes the reference's steps with the same
    sequence of rho."""
    options = {"lr": LR_MAX, "momentum": 0.9, "weight_decay": 1e-3}
    model = make_model()
    expected = clone_model(model)
    gsam = GSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=0.3, backend=backend, **options)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(gsam, T_max=STEPS + 1, eta_min=LR_MIN)
    rho_schedule = ProportionalRho(gsam, **RHO_BOUNDS)
    reference = EagerGSAM(expected, torch.optim.SGD(expected.parameters(), **options), rho=RHO_MAX, alpha=0.3)
    rhos = []
    for t, (x, y) in enumerate(make_batches(STEPS + 1)):
        rho = proportional_rho(cosine_lr(t, STEPS + 1), **RHO_BOUNDS)
        rhos.append(rho)
        assert gsam.param_groups[0]["lr"] == pytest.approx(cosine_lr(t, STEPS + 1))
        assert rho_schedule.get_last_rho() == pytest.approx([rho])
        assert gsam.param_groups[0]["sam_rho"] == pytest.approx(rho)
        train(gsam, model, [(x, y)], first=t)
        lr_schedule.step()
        rho_schedule.step()
        reference.rho = rho
        reference.step(expected, x, y)
        reference.base.param_groups[0]["lr"] = cosine_lr(t + 1, STEPS + 1)
    assert rhos[0] == pytest.approx(RHO_MAX) and rhos[-1] < rhos[1] < RHO_MAX
    assert_models_close(model, expected)
