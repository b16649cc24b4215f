"""Sparse SAM against the eager implementation of sparse_sam_reference.py over a few steps of the small
BatchNorm model, each run crossing mask refreshes: both criteria, SGD and AdamW, both calling styles,
the fused and generic paths and a GradScaler; sparsity 0 is SAM; the mask keeps exactly
floor((1 - sparsity) N) weights and is stored as bits; exact resume across a refresh; steps skipped for a
non-finite gradient; bad option values refused."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from eager_reference import (
    HostSyncCounter,
    assert_models_close,
    assert_models_equal,
    batch_loss,
    clone_model,
    closure_step,
    make_batches,
    make_mlp,
    make_model,
)
from sparse_sam_reference import EagerSparseSAM, kept
from targets import OPTIMIZER_BACKENDS, require
from tolerance import assert_bitwise_equal
from variant_reference import EagerSAMStep, poison

from sam_kernels.optim import Interval, freeze_bn_stats
from sam_kernels.optim.sparse_sam import MASK_KEY, SparseSAM

SEED = 1234

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
}

#: Options of both sides: each run refreshes at steps 0, 2 and 4 (Fisher: the sum over the step before
#: each refresh and the refresh's own), with rho and sparsity far from SAM's trajectory.
SETTINGS = {
    "fisher": {"rho": 0.1, "sparsity": 0.4, "update_every": 2, "criterion": "fisher", "fisher_batches": 2},
    "dynamic": {"rho": 0.1, "sparsity": 0.4, "update_every": 2, "criterion": "dynamic", "drop_rate": 0.5},
    "fisher_full_norm": {"rho": 0.1, "sparsity": 0.7, "update_every": 3, "criterion": "fisher",
                         "fisher_batches": 3, "masked_norm": False},
    "dynamic_weight": {"rho": 0.1, "sparsity": 0.6, "update_every": 2, "criterion": "dynamic",
                       "drop_rate": 0.8, "drop_by": "weight", "grow_by": "gradient", "total_steps": 4},
    "dynamic_random": {"rho": 0.1, "sparsity": 0.3, "update_every": 1, "criterion": "dynamic",
                       "drop_rate": 0.3, "drop_by": "random", "grow_by": "random"},
}


def reference_options(name: str) -> dict:
    return {**SETTINGS[name], "seed": SEED}


def build(model, name: str, base_name: str = "sgd", backend: str = "torch", **extra) -> SparseSAM:
    cls, base_options = BASES[base_name]
    options = {"seed": SEED, **SETTINGS[name], **extra}
    return SparseSAM(model.parameters(), cls, backend=backend, **options, **base_options)


def build_reference(model, name: str, base_name: str = "sgd") -> EagerSparseSAM:
    cls, base_options = BASES[base_name]
    return EagerSparseSAM(model, cls(model.parameters(), **base_options), **reference_options(name))


def two_call_step(optimizer, model, x, y) -> None:
    """The two-call loop style, BatchNorm frozen in the second pass."""
    optimizer.zero_grad()
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    with freeze_bn_stats(model):
        batch_loss(model, x, y).backward()
    optimizer.second_step(zero_grad=True)


def train(optimizer, model, batches, first: int = 0) -> None:
    """Step ``first + i`` takes batch i in the two-call style when even, by closure when odd."""
    for step, (x, y) in enumerate(batches, start=first):
        (closure_step if step % 2 else two_call_step)(optimizer, model, x, y)


def assert_same_masks(optimizer, model, reference) -> None:
    for index, (p, q) in enumerate(zip(model.parameters(), reference.params, strict=True)):
        assert torch.equal(optimizer.mask(p), reference.mask[q]), f"parameter {index}: mask"
    assert optimizer.policy.next_refresh == reference.next_refresh


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
        assert actual == expected, where


# ---------------------------------------------------------------------------- against the reference


STEPS = 5


#: (backend, setting, base): every op backend; under the Triton interpreter (seconds a case) one case in
#: the default run, the rest marked slow.
CASES = [pytest.param(backend, name, base_name, id=f"{backend}-{name}-{base_name}",
                      marks=[pytest.mark.slow] if backend == "triton" and name + base_name != "dynamicadamw"
                      else [])
         for backend in OPTIMIZER_BACKENDS for name in ("fisher", "dynamic")
         for base_name in ("sgd", "adamw")]


@pytest.mark.parametrize(("backend", "name", "base_name"), CASES)
def test_matches_reference(backend, name, base_name):
    """Five steps (refreshes at 0, 2, 4; both calling styles): weights, BatchNorm buffers, the masks
    (exactly) and the refresh counter equal the reference's."""
    require(backend)
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, name, base_name, backend)
    reference = build_reference(expected, name, base_name)
    batches = make_batches(STEPS)
    train(optimizer, model, batches)
    for x, y in batches:
        reference.step(expected, x, y)
    assert reference.refreshes == [0, 2, 4]
    assert_models_close(model, expected)
    assert_same_masks(optimizer, model, reference)


@pytest.mark.parametrize("name", ["fisher_full_norm", "dynamic_weight", "dynamic_random"])
def test_other_options_match_reference(name):
    """The authors' unmasked norm, the weight and gradient scores with the drop rate's cosine decay, and
    the random scores with a refresh at every step."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, name, "adamw")
    reference = build_reference(expected, name, "adamw")
    batches = make_batches(STEPS)
    train(optimizer, model, batches)
    for x, y in batches:
        reference.step(expected, x, y)
    assert_models_close(model, expected)
    assert_same_masks(optimizer, model, reference)


@pytest.mark.parametrize(("base_name", "fused", "amp"), [
    ("sgd", False, False), ("adamw", True, False), ("sgd", True, True), ("adamw", False, True),
    ("rmsprop", None, False), ("rmsprop", None, True),
])
def test_paths_and_grad_scaler_match_reference(base_name, fused, amp):
    """The fused and generic descents, a base without a fused step and a GradScaler (scale 2**10, exact
    in fp32) take the reference's steps (the two-call loop through ``scaler.step``)."""
    model = make_mlp()
    expected = clone_model(model)
    optimizer = build(model, "fisher", base_name, fused=fused)
    reference = build_reference(expected, "fisher", base_name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
    batches = make_batches(STEPS)
    for x, y in batches:
        optimizer.zero_grad()
        loss = batch_loss(model, x, y)
        (scaler.scale(loss) if amp else loss).backward()
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        loss = batch_loss(model, x, y)
        (scaler.scale(loss) if amp else loss).backward()
        if amp:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.second_step(zero_grad=True)
        reference.step(expected, x, y)
    assert optimizer.uses_fused_step == (base_name != "rmsprop" and fused is not False)
    assert_models_close(model, expected)
    assert_same_masks(optimizer, model, reference)


@pytest.mark.parametrize("criterion", ["fisher", "dynamic"])
def test_sparsity_zero_is_sam(criterion):
    """With sparsity 0 every weight is in the mask: SAM's steps (the reference SAM)."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, criterion, "adamw", sparsity=0.0)
    cls, base_options = BASES["adamw"]
    reference = EagerSAMStep(expected, cls(expected.parameters(), **base_options), rho=0.1)
    batches = make_batches(STEPS)
    train(optimizer, model, batches)
    for x, y in batches:
        reference.step(expected, x, y)
    assert_models_close(model, expected)
    assert all(optimizer.mask(p).all() for p in model.parameters())


# -------------------------------------------------------------------------------------- the mask


SHAPES = [(7,), (3, 5), (2, 3, 3), (1,), (13,)]  # 55 weights, none a multiple of 8


class Odd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in SHAPES])

    def loss(self) -> torch.Tensor:
        return sum((w.sin() * w).sum() for w in self.weights)


@pytest.mark.parametrize("criterion", ["fisher", "dynamic"])
@pytest.mark.parametrize("sparsity", [0.0, 1e-9, 0.3, 0.5, 0.7, 0.98, 0.999])
def test_mask_keeps_exactly_k_weights(criterion, sparsity):
    """Over every parameter together exactly K = N - ceil(sparsity N) weights are in the mask, at each of
    several refreshes (zero gradients and equal scores tie: the count stays exact)."""
    module = Odd()
    extra = {"fisher_batches": 1} if criterion == "fisher" else {"drop_rate": 0.5}
    optimizer = SparseSAM(module.parameters(), torch.optim.SGD, lr=0.1, sparsity=sparsity, update_every=1,
                          criterion=criterion, seed=SEED, backend="torch", **extra)
    total = sum(math.prod(s) for s in SHAPES)
    with torch.no_grad():
        module.weights[1][0].zero_()  # a few zero gradients (sin(w) w has gradient 0 at w = 0)
    for _ in range(3):
        optimizer.zero_grad()
        module.loss().backward()
        optimizer.step(module.loss)
        count = sum(int(optimizer.mask(p).sum()) for p in module.weights)
        assert count == kept(total, sparsity)


def test_mask_is_stored_as_bits():
    """The mask of each parameter is a uint8 tensor of ceil(numel / 8) bytes in the optimizer state, the
    bits of the flattened tensor least significant first, the padding zero."""
    module = Odd()
    optimizer = SparseSAM(module.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, update_every=5,
                          seed=SEED, backend="torch")
    optimizer.zero_grad()
    module.loss().backward()
    optimizer.step(module.loss)
    for p in module.weights:
        packed = optimizer.state[p][MASK_KEY]
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() * packed.element_size() == math.ceil(p.numel() / 8)
        bits = [(int(byte) >> bit) & 1 for byte in packed.tolist() for bit in range(8)]
        assert not any(bits[p.numel():])
        assert bits[:p.numel()] == optimizer.mask(p).reshape(-1).int().tolist()
    assert [k for k in optimizer.state_dict()["state"][0]] == [MASK_KEY]  # SGD without momentum keeps none


@pytest.mark.parametrize("criterion", ["fisher", "dynamic"])
def test_host_reads_only_on_refresh_and_sum_steps(criterion):
    """On the fused path a step between refreshes reads nothing on the host; a refresh (or a step that
    feeds the Fisher sum) reads the step's non-finite flag once, to commit only a taken step."""
    model = make_mlp()
    extra = {"fisher_batches": 2} if criterion == "fisher" else {}
    optimizer = SparseSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, update_every=4,
                          criterion=criterion, seed=SEED, backend="torch", **extra)
    reads = []
    for x, y in make_batches(5):
        with HostSyncCounter() as counter:
            closure_step(optimizer, model, x, y)
        reads.append(len(counter.syncs))
    assert optimizer.uses_fused_step
    assert reads == ([1, 0, 0, 1, 1] if criterion == "fisher" else [1, 0, 0, 0, 1])


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("name", ["fisher_full_norm", "dynamic"])
def test_resume_equals_uninterrupted_run(name):
    """Saved after 3 steps (Fisher: with a sum under way for the refresh at step 3; dynamic: between
    refreshes), loaded into a fresh model and optimizer, 3 more steps across a refresh: weights,
    BatchNorm buffers and the whole optimizer state (uint8 masks included) equal the uninterrupted run's
    bit for bit."""
    batches = make_batches(6)
    model = make_model()
    optimizer = build(model, name, "adamw")
    train(optimizer, model, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(optimizer, model, batches[3:], first=3)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    again = build(resumed, name, "adamw", seed=SEED + 1)  # the seed comes from the checkpoint too
    again.load_state_dict(checkpoint["optimizer"])
    assert all(again.state[p][MASK_KEY].dtype == torch.uint8 for p in resumed.parameters())
    train(again, resumed, batches[3:], first=3)
    assert_models_equal(resumed, model)
    assert_same(again.state_dict(), optimizer.state_dict())


def test_a_bad_mask_in_a_state_dict_is_refused_before_loading():
    model = make_model()
    optimizer = build(model, "fisher")
    train(optimizer, model, make_batches(1))
    state = optimizer.state_dict()
    before = copy.deepcopy(state)
    bad = copy.deepcopy(state)
    bad["state"][0][MASK_KEY] = bad["state"][0][MASK_KEY].float()
    with pytest.raises(ValueError, match=MASK_KEY):
        optimizer.load_state_dict(bad)
    bad["state"][0][MASK_KEY] = torch.zeros(99, dtype=torch.uint8)
    with pytest.raises(ValueError, match=MASK_KEY):
        optimizer.load_state_dict(bad)
    assert_same(optimizer.state_dict(), before)


def test_a_bad_mask_in_the_state_fails_the_step_before_any_change():
    """A mask entry replaced by hand with the wrong size: the step raises, naming the entry, with the
    weights and the state as they were."""
    model = make_mlp()
    optimizer = build(model, "dynamic")
    batches = make_batches(2)
    train(optimizer, model, batches[:1])
    first = next(iter(model.parameters()))
    optimizer.state[first][MASK_KEY] = torch.zeros(1, dtype=torch.uint8)
    weights = [p.detach().clone() for p in model.parameters()]
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=MASK_KEY):
        closure_step(optimizer, model, *batches[1])
    assert_bitwise_equal([p.detach() for p in model.parameters()], weights)
    assert_same(optimizer.state_dict(), before)


# ------------------------------------------------------------------------------------- non-finite


#: (pass, value) written into a gradient at each step, or None. With refreshes due at 0, 2, 4: the first
#: refresh is skipped (due again at 1), an accumulation step and a refresh are skipped later.
INJECTIONS = [("ascent", math.nan), None, ("descent", math.inf), None, ("ascent", -math.inf), None, None]


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("name", ["fisher", "dynamic"])
def test_non_finite_gradient_skips_the_step(name):
    """A NaN or inf in either pass skips the step: the weights are restored bit for bit, the state (the
    base optimizer's, the mask, the Fisher sum, the refresh counter) is unchanged, and the run goes on
    like the reference's, whose refresh stays due after a skipped one."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, name, "adamw")
    reference = build_reference(expected, name, "adamw")
    params = list(model.parameters())
    for step, ((x, y), bad) in enumerate(zip(make_batches(len(INJECTIONS)), INJECTIONS, strict=True)):
        weights = [p.detach().clone() for p in params]
        state = copy.deepcopy(optimizer.state_dict())
        optimizer.zero_grad()
        batch_loss(model, x, y).backward()
        if bad is not None and bad[0] == "ascent":
            poison(bad[1])([p.grad for p in params])
        optimizer.first_step(zero_grad=True)
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
        after = optimizer.state_dict()
        after["sam"]["step"] -= 1  # the step counter counts skipped steps
        for index, entry in after["state"].items():
            if index in state["state"]:
                assert_same(entry, state["state"][index], f"step {step}: state[{index}]")
            else:  # a fused step may create a fresh entry even when skipped; nothing of SparseSAM's
                assert MASK_KEY not in entry
                assert not any(torch.is_tensor(v) and v.any() for v in entry.values())
        assert after["sam"] == state["sam"], f"step {step}: the refresh counter"
    assert reference.refreshes == [1, 3, 5]
    assert_models_close(model, expected)
    assert_same_masks(optimizer, model, reference)


# ------------------------------------------------------------------------------------- bad values


BAD = [
    ("sparsity", -0.1), ("sparsity", 1.0), ("sparsity", math.nan), ("sparsity", True),
    ("update_every", 0), ("update_every", 2.0), ("update_every", True),
    ("criterion", "magnitude"), ("criterion", None),
    ("fisher_batches", 0), ("fisher_batches", 2001), ("fisher_batches", 1.5),
    ("drop_rate", -0.1), ("drop_rate", 1.5), ("drop_rate", math.nan),
    ("drop_by", "size"), ("grow_by", "momentum"), ("total_steps", 0), ("total_steps", 10.0),
]


def _options(option: str, value) -> dict:
    dynamic = option in ("drop_rate", "drop_by", "grow_by", "total_steps")
    return {"criterion": "dynamic" if dynamic else "fisher", option: value}


@pytest.mark.parametrize(("option", "value"), BAD, ids=[f"{option}={value}" for option, value in BAD])
def test_bad_values_are_refused(option, value):
    with pytest.raises(ValueError, match=rf"^{option}\b"):
        SparseSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, **_options(option, value))


@pytest.mark.parametrize(("options", "error", "name"), [
    ({"criterion": "fisher", "drop_rate": 0.3}, ValueError, "drop_rate"),
    ({"criterion": "dynamic", "fisher_batches": 4}, ValueError, "fisher_batches"),
    ({"masked_norm": 1}, TypeError, "masked_norm"),
    ({"adaptive": True}, ValueError, "adaptive"),
    ({"schedule": Interval(2)}, ValueError, "schedule"),
    ({"capturable": True}, ValueError, "capturable"),
], ids=["drop_rate-with-fisher", "fisher_batches-with-dynamic", "masked_norm", "adaptive", "schedule",
        "capturable"])
def test_options_that_do_not_apply_are_refused(options, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        SparseSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, **options)


def test_the_ends_of_the_ranges_are_accepted():
    params = list(make_model().parameters())
    SparseSAM(params, torch.optim.SGD, lr=0.1, sparsity=0.0, update_every=1, fisher_batches=1)
    SparseSAM(params, torch.optim.SGD, lr=0.1, update_every=3, fisher_batches=3)
    SparseSAM(params, torch.optim.SGD, lr=0.1, criterion="dynamic", drop_rate=0.0, total_steps=1)
    SparseSAM(params, torch.optim.SGD, lr=0.1, criterion="dynamic", drop_rate=1.0)
