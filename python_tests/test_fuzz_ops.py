"""Property-based fuzzing of every op of ``sam_kernels.ops``: each kernel backend present against the
pure-torch reference backend, over random tensor lists (counts, shapes, dtypes, missing gradients),
options, seeds and RNG steps, with NaN, inf and fp32-overflowing values injected into the gradients.

Kernel backends: the ``kernel`` fixture of conftest.py (the list of targets.py): native CPU and Triton
(under the interpreter) here, native CUDA and Triton on a GPU when one exists. Values are compared at the
dtype tolerances of ``tolerance.py``; restores, backups, masks, skipped steps and non-finite flags must
match exactly. The example counts come from ``fuzz_profile.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from cases import slow_in_the_interpreter
from fuzz_profile import fuzz_tests
from hypothesis import event
from hypothesis import strategies as st
from targets import require
from tensors import clones
from tolerance import TOLERANCES, assert_bitwise_equal, assert_close

from sam_kernels import ops

# NOTE: the injected NaN/inf make the Triton interpreter's numpy overflow and divide by zero; expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Sizes around the vector widths and block tails of the kernels.
ODD_SIZES = (0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 257, 383)
#: Values written into gradients: non-finite ones, and finite ones whose square overflows fp32.
BAD_VALUES = (math.nan, math.inf, -math.inf, 1e25, -1e25)

#: The smallest normal fp32 number. NOTE: scalar options are drawn as 0 or at least this, which keeps
#: the profile's draws as they were when the Triton interpreter mis-cast smaller Python floats (see
#: test_triton_interpreter_bf16_with_a_tiny_rho below, now a regression test).
FP32_TINY = 2.0**-126


# --------------------------------------------------------------------------------------- strategies


def reals(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats in [low, high] that are 0 or in fp32's normal range."""
    return st.floats(low, high).filter(lambda x: x == 0.0 or abs(x) >= FP32_TINY)


numels = st.one_of(st.sampled_from(ODD_SIZES), st.integers(0, 400))
shapes = st.one_of(
    st.just(()),
    numels.map(lambda n: (n,)),
    st.tuples(st.integers(0, 19), st.integers(0, 19)),
    st.tuples(st.integers(1, 5), st.integers(0, 7), st.integers(1, 9)),
)
seeds = st.integers(0, 2**64 - 1)
unit = st.floats(0.0, 1.0, exclude_max=True)
bad_entries = st.lists(st.tuples(st.integers(0, 5), unit, st.sampled_from(BAD_VALUES)), max_size=2)
scalar_shapes = st.sampled_from([(), (1,)])
#: found_inf: absent, clear or set (a one-element fp32 tensor, the convention of torch.amp).
found_infs = st.sampled_from([None, 0.0, 1.0])
multipliers = st.one_of(st.none(), st.sampled_from([1.0, 0.5, 2.0]), reals(0.1, 4.0))


@dataclass(frozen=True)
class Tensors:
    """A random parameter list and its gradients.

    ``layout``: (shape, dtype) per parameter; ``seed``: of the values; ``missing``: parameters without a
    gradient; ``zero``: every gradient is zero (before ``bad``); ``bad``: (parameter, position in [0, 1),
    value) written into the gradients (skipped for a missing or empty gradient).
    """

    layout: tuple
    seed: int
    missing: tuple
    zero: bool
    bad: tuple

    def values(self, stream: int, device, scale: float = 1.0, positive: bool = False) -> list[torch.Tensor]:
        """Random tensors of the layout; ``stream`` picks an independent set."""
        generator = torch.Generator().manual_seed(self.seed * 16 + stream)
        out = []
        for shape, dtype in self.layout:
            value = torch.randn(shape, generator=generator) * scale
            out.append((value.abs() if positive else value).to(dtype).to(device))
        return out

    def params(self, device) -> list[torch.Tensor]:
        return self.values(0, device)

    def grads(self, device) -> list[torch.Tensor | None]:
        grads = self.values(1, device)
        if self.zero:
            grads = [torch.zeros_like(g) for g in grads]
        for index, where, value in self.bad:
            grad = grads[index % len(grads)]
            if grad.numel():
                grad.view(-1)[min(int(where * grad.numel()), grad.numel() - 1)] = value
        return [None if missing else g for g, missing in zip(grads, self.missing, strict=True)]


@st.composite
def tensor_lists(draw, allow_bad: bool = True) -> Tensors:
    count = draw(st.integers(1, 6))
    if draw(st.booleans()):
        dtypes = [draw(st.sampled_from(DTYPES))] * count
    else:
        dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=count, max_size=count))
    layout = tuple(zip(draw(st.lists(shapes, min_size=count, max_size=count)), dtypes, strict=True))
    missing = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=count, max_size=count))
    zero = draw(st.integers(0, 9)) == 0
    bad = draw(bad_entries) if allow_bad and draw(st.integers(0, 2)) == 0 else []
    return Tensors(layout, draw(st.integers(0, 2**31 - 1)), tuple(missing), zero, tuple(bad))


# ---------------------------------------------------------------------------------------- helpers


def scalar(value: float | None, shape, device, dtype=torch.float32) -> torch.Tensor | None:
    return None if value is None else torch.full(shape, value, dtype=dtype, device=device)


def assert_matches(actual, expected, dtype: torch.dtype, msg: str = "", before=None) -> None:
    """NaN, +inf and -inf exactly where the reference has them; the finite values at ``dtype``'s
    tolerance.

    ``before``: the value that the op updated (``new = before + delta``). The tolerance is then relative
    to ``|before| + |delta|``, the operands of that last add, instead of to ``|new|``: where they nearly
    cancel, an fp32 rounding difference in ``delta`` (e.g. Adam's bias corrections) is large relative to
    ``new`` yet small relative to the operands. It is applied by shrinking the difference elementwise by
    ``(atol + rtol |new|) / (atol + rtol (|before| + |delta|))`` before ``assert_close``.
    """
    actual, expected = actual.float(), expected.float()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(actual), kind(expected)), f"{msg}: {kind.__name__} differs"
    finite = torch.isfinite(expected)
    actual, expected = torch.where(finite, actual, 0.0), torch.where(finite, expected, 0.0)
    if before is not None:
        rtol, atol = TOLERANCES[dtype]
        before = before.float()
        before = torch.where(finite & torch.isfinite(before), before, expected)
        operands = before.abs() + (expected - before).abs()
        actual = expected + (actual - expected) * ((atol + rtol * expected.abs()) / (atol + rtol * operands))
    assert_close(actual, expected, dtype, msg=msg)


def assert_unchanged(actual, before, msg: str) -> None:
    assert_bitwise_equal([t for t in actual if t is not None], [t for t in before if t is not None], msg)


# ------------------------------------------------------------------------------------------- norm


def grad_norm_matches_reference(kernel, tensors, adaptive, eta):
    backend, device = kernel.backend, kernel.device
    params, grads = tensors.params(device), tensors.grads(device)
    params_before, grads_before = clones(params), clones(grads)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=eta, backend=backend)
    ref_norm, ref_flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=eta, backend="torch")
    for value in (norm, flag):
        assert value.shape == () and value.dtype == torch.float32 and value.device == device
    event(f"non-finite flag: {flag.item()}")
    assert_bitwise_equal(flag, ref_flag, "non-finite flag")
    assert flag.item() in (0.0, 1.0)
    assert flag.item() == float(not math.isfinite(norm.item())), "the flag says whether the norm is finite"
    if flag.item() == 0.0:
        assert_close(norm, ref_norm, torch.float32, scale=10, msg="norm (summation order differs)")
    assert_unchanged(params, params_before, "params must be left as they are")
    assert_unchanged(grads, grads_before, "grads must be left as they are")


test_grad_norm_matches_reference, test_grad_norm_matches_reference_full = fuzz_tests(
    grad_norm_matches_reference, weight=2, tensors=tensor_lists(), adaptive=st.booleans(),
    eta=st.one_of(st.sampled_from([0.0, 0.01]), reals(0.0, 1.0)))


# ---------------------------------------------------------------------------------------- perturb


@dataclass(frozen=True)
class PerturbCase:
    """Options of one perturb_ call; ``norm`` is "grads" (the reference norm of the same gradients, as
    in training) or a given value, non-finite and zero included."""

    tensors: Tensors
    norm: str | float
    rho: float
    eps: float
    keep_prob: float
    scale_factor: float | None  # None: the op's default, 1 / keep_prob
    normalize: bool
    adaptive: bool
    eta: float
    seed: int
    step: int
    step_shape: tuple | None  # None: a Python int
    tensor_indices: tuple | None


keep_probs = st.one_of(st.sampled_from([1.0, 0.5, 0.1]), reals(1e-3, 1.0))
steps = st.one_of(st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1]), st.integers(0, 2**63 - 1))


@st.composite
def perturb_cases(draw) -> PerturbCase:
    tensors = draw(tensor_lists())
    count = len(tensors.layout)
    norm = draw(st.one_of(st.just("grads"), st.just("grads"), st.sampled_from([math.nan, math.inf, 0.0]),
                          reals(0.1, 10.0)))
    indices = draw(st.one_of(st.none(), st.lists(st.integers(0, 2**32 - 1), min_size=count,
                                                 max_size=count).map(tuple)))
    return PerturbCase(
        tensors=tensors, norm=norm,
        rho=draw(st.one_of(st.sampled_from([0.0, 0.05, 0.5]), reals(0.0, 2.0))),
        eps=draw(st.sampled_from([1e-12, 1e-12, 1e-6, 0.0])),
        keep_prob=draw(keep_probs),
        scale_factor=draw(st.one_of(st.none(), st.sampled_from([1.0, 1 / 0.6, -1.0]), reals(-100.0, 100.0))),
        normalize=draw(st.booleans()), adaptive=draw(st.booleans()),
        eta=draw(st.sampled_from([0.0, 0.01, 0.5])), seed=draw(seeds), step=draw(steps),
        step_shape=draw(st.sampled_from([(), (), (1,), None])), tensor_indices=indices)


def perturb_matches_reference(kernel, case):
    backend, device = kernel.backend, kernel.device
    params, grads = case.tensors.params(device), case.tensors.grads(device)
    if case.norm == "grads":
        norm = ops.grad_norm(params, grads, adaptive=case.adaptive, adaptive_eta=case.eta,
                             backend="torch")[0]
    else:
        norm = torch.tensor(case.norm, device=device)
    garbage = [torch.full_like(p, 7.0) for p in params]
    grads_before, norm_before = clones(grads), norm.clone()
    results = {}
    for name in (backend, "torch"):
        step = case.step if case.step_shape is None else torch.full(case.step_shape, case.step,
                                                                     dtype=torch.int64, device=device)
        out, backups = clones(params), clones(garbage)
        ops.perturb_(out, backups, norm, grads=grads, rho=case.rho, eps=case.eps, keep_prob=case.keep_prob,
                     scale_factor=case.scale_factor, normalize=case.normalize,
                     adaptive=case.adaptive, adaptive_eta=case.eta,
                     seed=case.seed, step=step, tensor_indices=case.tensor_indices, backend=name)
        results[name] = out, backups
    out, backups = results[backend]
    ref_out, ref_backups = results["torch"]
    finite_norm = math.isfinite(norm.item())
    event(f"finite norm: {finite_norm}")
    for i, (shape, dtype) in enumerate(case.tensors.layout):
        where = f"tensor {i} {shape} {dtype}"
        if grads[i] is None:
            assert_bitwise_equal(out[i], params[i], f"{where}: no gradient, so no perturbation")
            assert_bitwise_equal(backups[i], garbage[i], f"{where}: no gradient, so no backup")
            continue
        assert_bitwise_equal(backups[i], params[i], f"{where}: the backup is the exact pre-step weight")
        if not finite_norm:
            assert_bitwise_equal(out[i], params[i], f"{where}: a non-finite norm leaves w untouched")
        else:
            assert_matches(out[i], ref_out[i], dtype, where, before=params[i])
            finite_scale = not case.normalize or norm.item() + case.eps > 0
            if finite_scale and not grads[i].any():
                assert torch.equal(out[i], params[i]), f"{where}: a zero gradient moves nothing"
    assert_bitwise_equal(ref_backups, backups)
    assert_unchanged(grads, grads_before, "grads must be left as they are")
    assert_bitwise_equal(norm, norm_before, "norm must be left as it is")


test_perturb_matches_reference, test_perturb_matches_reference_full = fuzz_tests(
    perturb_matches_reference, weight=2, case=perturb_cases())


def masks_match_reference_and_contract(kernel, layout, keep_prob, seed, step, offset):
    """The mask, read off w = 0 moved by g = 1, is the reference's bit for bit and the contract's
    Philox stream (backends/common.py) at the given global tensor indices."""
    backend, device = kernel.backend, kernel.device
    indices = [offset + i for i in range(len(layout))]
    masks = {}
    for name in (backend, "torch"):
        params = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in layout]
        grads = [torch.ones_like(p) for p in params]
        ops.perturb_(params, [torch.empty_like(p) for p in params], torch.tensor(1.0, device=device),
                     grads=grads, rho=1.0, keep_prob=keep_prob, seed=seed,
                     step=torch.tensor(step, dtype=torch.int64, device=device), tensor_indices=indices,
                     backend=name)
        masks[name] = [p != 0 for p in params]
    assert_bitwise_equal(masks[backend], masks["torch"], "mask differs from the reference")
    threshold = ops.mask_threshold(keep_prob)
    for (shape, _), index, mask in zip(layout, indices, masks[backend], strict=True):
        expected = ops.keep_mask(mask.numel(), index, seed, step, threshold, device).view(shape)
        assert_bitwise_equal(mask, expected, f"tensor index {index}: mask differs from the contract")


test_masks_match_reference_and_contract, test_masks_match_reference_and_contract_full = fuzz_tests(
    masks_match_reference_and_contract, weight=2,
    layout=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6),
    keep_prob=keep_probs, seed=seeds, step=steps, offset=st.integers(0, 2**32 - 7))


# ---------------------------------------------------------------------------------------- restore

#: Bit patterns of NaNs (quiet and signalling, both signs, with payloads) per dtype, as signed ints.
NAN_BITS = {
    torch.float32: (0x7FC00000, 0x7FC12345, 0x7F800001, 0x7FBFFFFF, -0x00400000, -0x003EDCBB),
    torch.float16: (0x7E00, 0x7E15, 0x7C01, 0x7DFF, -0x0200, -0x01EB),
    torch.bfloat16: (0x7FC0, 0x7FC5, 0x7F81, 0x7FBF, -0x0040, -0x003B),
    torch.float64: (0x7FF8000000000000, 0x7FF8000012345678, 0x7FF0000000000001, 0x7FF7FFFFFFFFFFFF,
                    -0x0008000000000000, -0x0007EDCBA9876544),
}
INT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def restore_is_bitwise(kernel, tensors, specials):
    """w = backup bit for bit, NaN payloads (signalling ones included), infinities and -0.0 too."""
    backend, device = kernel.backend, kernel.device
    backups, params = tensors.values(2, device), tensors.params(device)
    for index, where, kind in specials:
        backup = backups[index % len(backups)]
        if not backup.numel():
            continue
        position = min(int(where * backup.numel()), backup.numel() - 1)
        if kind < 6:
            bits = torch.tensor(NAN_BITS[backup.dtype][kind], dtype=INT_VIEWS[backup.dtype])
            backup.view(-1).view(INT_VIEWS[backup.dtype])[position] = bits.to(device)
        else:
            backup.view(-1)[position] = (math.inf, -0.0)[kind - 6]
    before = clones(backups)
    ops.restore_(params, backups, backend=backend)
    assert_bitwise_equal(params, before, "restore must copy the backups bit for bit")
    assert_bitwise_equal(backups, before, "the backups must be left as they are")


test_restore_is_bitwise, test_restore_is_bitwise_full = fuzz_tests(
    restore_is_bitwise, weight=2, tensors=tensor_lists(allow_bad=False),
    specials=st.lists(st.tuples(st.integers(0, 5), unit, st.integers(0, 7)), max_size=4))


# ------------------------------------------------------------------------------- restore and step


def _restored_weights(params, backups, alias):
    """Working copies: parameters, and backups that are the parameter itself where ``alias`` says so."""
    out = clones(params)
    return out, [out[i] if alias[i] else b.clone() for i, b in enumerate(backups)]


@dataclass(frozen=True)
class DescentCase:
    """What a fused descent call of either base optimizer takes besides its options: the tensors,
    ``alias`` (which parameters are their own backup, not perturbed), the gradient multiplier and
    found-inf flag (None: not given) and the shape of those device scalars."""

    tensors: Tensors
    alias: tuple
    multiplier: float | None
    found_inf: float | None
    scalar_shape: tuple

    def scalars(self, device) -> dict:
        """The ``grad_multiplier`` and ``found_inf`` arguments on ``device``."""
        return {"grad_multiplier": scalar(self.multiplier, self.scalar_shape, device),
                "found_inf": scalar(self.found_inf, self.scalar_shape, device)}

    def inputs(self, device):
        """(params, backups, grads, the weights a restore gives: the backup, or the parameter itself)."""
        tensors = self.tensors
        params, backups, grads = tensors.params(device), tensors.values(2, device), tensors.grads(device)
        restored = [params[i] if self.alias[i] else backups[i] for i in range(len(params))]
        return params, backups, grads, restored


@dataclass(frozen=True)
class SgdCase(DescentCase):
    """Options and state of one restore_sgd_step_ call; ``buffers``: which parameters already have a
    momentum buffer."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    buffers: tuple


@st.composite
def sgd_cases(draw) -> SgdCase:
    tensors = draw(tensor_lists())
    count = len(tensors.layout)
    momentum = draw(st.one_of(st.just(0.0), st.sampled_from([0.9]), reals(0.0, 0.99)))
    dampening = draw(st.one_of(st.just(0.0), reals(0.0, 0.9)))
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    flags = st.lists(st.booleans(), min_size=count, max_size=count).map(tuple)
    return SgdCase(
        tensors=tensors, lr=draw(st.one_of(st.sampled_from([0.1, 0.0]), reals(0.0, 1.0))),
        momentum=momentum, dampening=dampening,
        weight_decay=draw(st.one_of(st.just(0.0), reals(0.0, 0.1))), nesterov=nesterov,
        maximize=draw(st.booleans()), buffers=draw(flags), alias=draw(flags),
        multiplier=draw(multipliers), found_inf=draw(found_infs), scalar_shape=draw(scalar_shapes))


def restore_sgd_step_matches_reference(kernel, case):
    backend, device = kernel.backend, kernel.device
    tensors = case.tensors
    params, backups, grads, restored = case.inputs(device)
    buffers = [b if has else None for b, has in zip(tensors.values(3, device), case.buffers, strict=True)]
    grads_before = clones(grads)
    skip = bool(case.found_inf)
    results = {}
    for name in (backend, "torch"):
        out, out_backups = _restored_weights(params, backups, case.alias)
        out_buffers = clones(buffers)
        returned = ops.restore_sgd_step_(
            out, out_backups, out_buffers, grads=grads, lr=case.lr, momentum=case.momentum,
            dampening=case.dampening, weight_decay=case.weight_decay, nesterov=case.nesterov,
            maximize=case.maximize, backend=name, **case.scalars(device))
        results[name] = out, out_backups, out_buffers, returned
    out, out_backups, out_buffers, returned = results[backend]
    ref_out, _, _, ref_returned = results["torch"]
    for i, (shape, dtype) in enumerate(tensors.layout):
        where = f"tensor {i} {shape} {dtype}"
        if not case.alias[i]:
            assert_bitwise_equal(out_backups[i], backups[i], f"{where}: the backup must stay as it is")
        if buffers[i] is not None:
            assert returned[i] is out_buffers[i], f"{where}: an existing buffer is updated in place"
        if grads[i] is None or case.momentum == 0:
            assert (returned[i] is None) == (buffers[i] is None), f"{where}: no buffer to create"
            if buffers[i] is not None:
                assert_bitwise_equal(returned[i], buffers[i], f"{where}: the buffer must stay as it is")
        if grads[i] is None or skip:
            assert_bitwise_equal(out[i], restored[i], f"{where}: the weight must be restored bit for bit")
            if case.momentum != 0 and grads[i] is not None:
                expected = buffers[i] if buffers[i] is not None else torch.zeros_like(params[i])
                assert_bitwise_equal(returned[i], expected, f"{where}: found_inf keeps the buffer")
            continue
        assert_matches(out[i], ref_out[i], dtype, f"{where}: weight", before=restored[i])
        if case.momentum != 0:
            old = buffers[i] if buffers[i] is not None else torch.zeros_like(params[i])
            assert_matches(returned[i], ref_returned[i], dtype, f"{where}: momentum buffer", before=old)
    assert_unchanged(grads, grads_before, "grads must be left as they are")


test_restore_sgd_step_matches_reference, test_restore_sgd_step_matches_reference_full = fuzz_tests(
    restore_sgd_step_matches_reference, weight=2, case=sgd_cases())


@dataclass(frozen=True)
class AdamCase(DescentCase):
    """Options and state of one restore_adam_step_ call; ``steps``: each parameter's step counter before
    the call; ``pass_max``: give max_exp_avg_sqs even without amsgrad (it must then be ignored)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool
    steps: tuple
    pass_max: bool


@st.composite
def adam_cases(draw) -> AdamCase:
    tensors = draw(tensor_lists())
    count = len(tensors.layout)
    step_counts = st.one_of(st.sampled_from([0, 1, 9]), st.integers(0, 2000))
    return AdamCase(
        tensors=tensors, lr=draw(st.one_of(st.sampled_from([1e-3, 0.01]), reals(1e-4, 0.1))),
        beta1=draw(st.one_of(st.sampled_from([0.9, 0.0, 0.5]), reals(0.0, 0.95))),
        beta2=draw(st.one_of(st.sampled_from([0.999, 0.99, 0.9]), reals(0.5, 0.999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3, 0.0])),
        weight_decay=draw(st.one_of(st.just(0.0), st.sampled_from([0.01]), reals(0.0, 0.1))),
        decoupled=draw(st.booleans()), amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
        steps=tuple(draw(st.lists(step_counts, min_size=count, max_size=count))),
        alias=tuple(draw(st.lists(st.booleans(), min_size=count, max_size=count))),
        pass_max=draw(st.booleans()), multiplier=draw(multipliers), found_inf=draw(found_infs),
        scalar_shape=draw(scalar_shapes))


def restore_adam_step_matches_reference(kernel, case):
    backend, device = kernel.backend, kernel.device
    tensors = case.tensors
    params, backups, grads, restored = case.inputs(device)
    exp_avgs = tensors.values(3, device, scale=0.1)
    exp_avg_sqs = tensors.values(4, device, scale=0.01, positive=True)
    max_sqs = tensors.values(5, device, scale=0.02, positive=True)
    steps = [torch.tensor(float(s), device=device) for s in case.steps]
    grads_before = clones(grads)
    skip = bool(case.found_inf)
    results = {}
    for name in (backend, "torch"):
        out, out_backups = _restored_weights(params, backups, case.alias)
        state = [clones(exp_avgs), clones(exp_avg_sqs), clones(max_sqs), clones(steps)]
        ops.restore_adam_step_(
            out, out_backups, state[0], state[1], state[2] if case.amsgrad or case.pass_max else None,
            state[3], grads=grads, lr=case.lr, betas=(case.beta1, case.beta2), eps=case.eps,
            weight_decay=case.weight_decay, decoupled_weight_decay=case.decoupled, amsgrad=case.amsgrad,
            maximize=case.maximize, backend=name, **case.scalars(device))
        results[name] = out, out_backups, state
    out, out_backups, state = results[backend]
    ref_out, _, ref_state = results["torch"]
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for i, (shape, dtype) in enumerate(tensors.layout):
        where = f"tensor {i} {shape} {dtype}"
        if not case.alias[i]:
            assert_bitwise_equal(out_backups[i], backups[i], f"{where}: the backup must stay as it is")
        advanced = grads[i] is not None and not skip
        assert state[3][i].item() == case.steps[i] + advanced, f"{where}: step counter"
        assert_bitwise_equal(state[3][i], ref_state[3][i], f"{where}: step counter")
        if not advanced:
            assert_bitwise_equal(out[i], restored[i], f"{where}: the weight must be restored bit for bit")
            for name, values, before in zip(names, state, (exp_avgs, exp_avg_sqs, max_sqs), strict=False):
                assert_bitwise_equal(values[i], before[i], f"{where}: {name} must stay as it is")
            continue
        assert_matches(out[i], ref_out[i], dtype, f"{where}: weight", before=restored[i])
        assert_matches(state[0][i], ref_state[0][i], dtype, f"{where}: exp_avg", before=exp_avgs[i])
        assert_matches(state[1][i], ref_state[1][i], dtype, f"{where}: exp_avg_sq", before=exp_avg_sqs[i])
        if case.amsgrad:
            assert_matches(state[2][i], ref_state[2][i], dtype, f"{where}: max_exp_avg_sq",
                           before=max_sqs[i])
        else:
            assert_bitwise_equal(state[2][i], max_sqs[i], f"{where}: max_exp_avg_sq is unused")
    assert_unchanged(grads, grads_before, "grads must be left as they are")


test_restore_adam_step_matches_reference, test_restore_adam_step_matches_reference_full = fuzz_tests(
    restore_adam_step_matches_reference, weight=2, case=adam_cases())


# ------------------------------------------- mismatches the fuzzing found (regressions) and a known one


def test_triton_amsgrad_max_keeps_nan():
    """amsgrad's running max propagates a NaN, as torch.maximum, torch.optim.Adam and native do (a
    plain tl.maximum drops it)."""
    require("triton")
    max_sqs = [torch.tensor([0.01])]
    ops.restore_adam_step_([torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], max_sqs,
                           [torch.tensor(0.0)], grads=[torch.tensor([math.nan])], lr=0.01, amsgrad=True,
                           backend="triton")
    assert torch.isnan(max_sqs[0]).all()


def test_triton_interpreter_bf16_with_a_tiny_rho():
    """A rho below 2**-126 leaves a bf16 weight of 1.0 at 1.0, as the reference does. (The interpreter
    once took such a Python-float scalar as an fp64 constant and cast fp64 to bf16 by integer
    conversion, giving 9.2e-41; the kernels now round every float argument to its compute dtype with
    tl.full first.)"""
    require("triton")
    params = [torch.ones(1, dtype=torch.bfloat16)]
    ops.perturb_(params, [torch.empty_like(params[0])], torch.tensor(0.0),
                 grads=[torch.zeros(1, dtype=torch.bfloat16)], rho=1e-39, normalize=False, backend="triton")
    assert params[0].item() == 1.0


def test_adam_found_inf_of_two_leaves_step_counters_unchanged():
    """Any nonzero found_inf (GradScaler sums per-device flags, so 2.0 occurs) leaves the step counters
    as they were (they once advanced by 1 - found_inf)."""
    params, backups, grads = [torch.ones(3)], [torch.zeros(3)], [torch.ones(3)]
    steps = [torch.tensor(5.0)]
    ops.restore_adam_step_(params, backups, [torch.zeros(3)], [torch.zeros(3)], None, steps, grads=grads,
                           lr=0.1, found_inf=torch.tensor(2.0), backend="torch")
    assert_bitwise_equal(params, backups)
    assert steps[0].item() == 5.0

# NOTE (test time): the quick shares that take longest in the Triton interpreter run there in the slow set
# (both twins); the native kernels and the reference keep them in the default run.
test_perturb_matches_reference = slow_in_the_interpreter()(test_perturb_matches_reference)
test_masks_match_reference_and_contract = slow_in_the_interpreter()(test_masks_match_reference_and_contract)
test_restore_adam_step_matches_reference = slow_in_the_interpreter()(test_restore_adam_step_matches_reference)
