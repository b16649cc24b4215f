"""Every op of every kernel backend present against the pure-torch reference backend, plus the op layer's
checks.

The ``kernel`` fixture yields each kernel backend on each device it runs on here: Triton under the
interpreter on CPU tensors, the native C++ kernels on the CPU, and on a GPU the native CUDA kernels and
Triton. The native CPU kernels compute in the reference's operation order without FMA contraction, so
perturb, the SGD step and restore match the reference bit for bit there; elsewhere (the interpreter's
vectorized math, FMA contraction on a GPU, Adam's sqrt) results match to the dtype's tolerance. Backend
specifics (build facts, the C++ Philox, opcheck, launch counts) are in ``backends/``.

Each op's comparison runs, on every kernel, a pairwise covering set of dtype x shapes x options (every
two values of any two of them together) by default, and the rest of the product under ``-m slow``
(cases.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import pairwise, slow_in_the_interpreter
from targets import Target
from tensors import clones, make_tensors
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels import ops
from sam_kernels.backends import reference
from sam_kernels.backends.common import mask_threshold

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Parameter shapes per case: tensor counts 1 and 3 (300 in the many-tensor tests); sizes 0, 1, 7, 1000 and
# more than one chunk of the backend under test ("chunk+").
SHAPE_SETS = {
    "one-empty": [(0,)],
    "one-scalar": [()],
    "three-odd": [(7,), (1,), (10, 100)],
    "three-with-empty": [(2, 0), (7,), (1000,)],
    "multi-chunk": [("chunk+",), (3, 5)],
}
MANY_SHAPES = [((i * 37) % 50,) for i in range(300)]


def shapes_for(shapes, target: Target) -> list[tuple]:
    """``shapes`` with "chunk+" replaced by two chunks and three elements of ``target``'s backend."""
    return [tuple(2 * target.chunk + 3 if d == "chunk+" else d for d in s) for s in shapes]


def run_both(target: Target, fn, *tensor_lists):
    """Run ``fn(backend, *lists)`` on fresh clones for ``target`` and the reference; return both."""
    kernel_lists = [clones(ts) for ts in tensor_lists]
    reference_lists = [clones(ts) for ts in tensor_lists]
    kernel_out = fn(target.backend, *kernel_lists)
    reference_out = fn("torch", *reference_lists)
    return (kernel_lists, kernel_out), (reference_lists, reference_out)


def assert_matches(actual, expected, dtype, target: Target, msg=""):
    """Bit for bit where the backend is exact, else to the dtype's tolerance."""
    if target.exact:
        assert_bitwise_equal(actual, expected, msg)
    else:
        assert_close(actual, expected, dtype, msg=msg)


def scalar(value, target: Target, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, device=target.device)


# ------------------------------------------------------------------------------------------------ norm


@pytest.mark.parametrize(*pairwise(dtype=DTYPES, shapes=SHAPE_SETS, adaptive=[False, True]))
def test_grad_norm_matches_reference(kernel, dtype, shapes, adaptive):
    shapes = shapes_for(shapes, kernel)
    params = make_tensors(shapes, dtype, 1, device=kernel.device)
    grads = make_tensors(shapes, dtype, 2, device=kernel.device)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=0.01, backend=kernel.backend)
    ref_norm, ref_flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=0.01, backend="torch")
    assert norm.dtype == torch.float32 and norm.shape == () and flag.shape == ()
    assert norm.device == kernel.device and flag.device == kernel.device
    assert_close(norm, ref_norm, torch.float32, scale=10)
    assert flag.item() == ref_flag.item() == 0.0


def test_grad_norm_many_tensors_and_mixed_dtypes(kernel):
    shapes = MANY_SHAPES[:150]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(shapes))]
    grads = [g.to(d) for g, d in zip(make_tensors(shapes, torch.float32, 3, device=kernel.device), dtypes)]
    params = clones(grads)
    norm, _ = ops.grad_norm(params, grads, backend=kernel.backend)
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert norm.item() == pytest.approx(expected, rel=1e-5)


def test_grad_norm_is_deterministic_and_skips_missing_grads(kernel):
    params = make_tensors([(2 * kernel.chunk + 3,), (33,), (5,)], torch.float32, device=kernel.device)
    grads = [torch.randn_like(params[0]), None, torch.randn_like(params[2])]
    first, _ = ops.grad_norm(params, grads, backend=kernel.backend)
    second, _ = ops.grad_norm(params, grads, backend=kernel.backend)
    assert_bitwise_equal(first, second)
    expected = torch.cat([grads[0], grads[2]]).double().norm()
    assert first.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_grad_norm_flags_non_finite(any_backend, bad):
    shapes = [(10,), (any_backend.chunk + 7,)]
    params = make_tensors(shapes, torch.float32, device=any_backend.device)
    grads = make_tensors(shapes, torch.float32, 5, device=any_backend.device)
    grads[1][any_backend.chunk + 1] = bad
    _, flag = ops.grad_norm(params, grads, backend=any_backend.backend)
    assert flag.item() == 1.0


def test_grad_norm_flags_overflowing_squares(any_backend):
    grads = [torch.full((4,), 3e38, device=any_backend.device)]
    _, flag = ops.grad_norm(clones(grads), grads, backend=any_backend.backend)
    assert flag.item() == 1.0


def test_grad_norm_without_any_grad_is_zero(any_backend):
    params = make_tensors([(3,), (4,)], torch.float32, device=any_backend.device)
    norm, flag = ops.grad_norm(params, [None, None], backend=any_backend.backend)
    assert norm.item() == 0.0 and flag.item() == 0.0


# --------------------------------------------------------------------------------------------- perturb


def _perturb(backend, params, grads, backups, *, norm, **options):
    ops.perturb_(params, backups, norm, grads=grads, backend=backend, **options)


PERTURB_OPTIONS = {
    "plain": {"keep_prob": 1.0, "adaptive": False},
    "masked-adaptive": {"keep_prob": 0.5, "adaptive": True, "adaptive_eta": 0.01},
    "sparse-mask-usam": {"keep_prob": 0.1, "adaptive": False, "normalize": False},
    "unmasked-scaled": {"keep_prob": 1.0, "scale_factor": 1 / 0.6},
    "masked-scaled-usam": {"keep_prob": 0.5, "scale_factor": 3.0, "normalize": False},
    "negative-scale": {"keep_prob": 1.0, "scale_factor": -1.0},
}


@pytest.mark.parametrize(*pairwise(dtype=DTYPES, shapes=SHAPE_SETS, options=PERTURB_OPTIONS))
def test_perturb_matches_reference(kernel, dtype, shapes, options):
    shapes = shapes_for(shapes, kernel)
    params = make_tensors(shapes, dtype, 1, device=kernel.device)
    grads = make_tensors(shapes, dtype, 2, device=kernel.device)
    backups = [torch.full_like(p, 7.0) for p in params]
    opts = dict(rho=0.5, seed=2**40 + 17, step=2**32 + 3, norm=scalar(3.5, kernel), **options)
    (out, _), (ref, _) = run_both(kernel, lambda b, *ls: _perturb(b, *ls, **opts), params, grads, backups)
    assert_bitwise_equal(out[2], params, "backup must be the exact pre-step weights")
    assert_bitwise_equal(ref[2], params)
    assert_matches(out[0], ref[0], dtype, kernel, "perturbed weights")


@slow_in_the_interpreter()  # NOTE (test time): hundreds of tensors
def test_perturb_many_tensors(kernel):
    params = make_tensors(MANY_SHAPES, torch.float32, 1, device=kernel.device)
    grads = make_tensors(MANY_SHAPES, torch.float32, 2, device=kernel.device)
    backups = [torch.empty_like(p) for p in params]
    opts = dict(norm=scalar(2.0, kernel), rho=0.1, keep_prob=0.5, adaptive=True, seed=9, step=11)
    (out, _), (ref, _) = run_both(kernel, lambda b, *ls: _perturb(b, *ls, **opts), params, grads, backups)
    assert_matches(out[0], ref[0], torch.float32, kernel)
    assert_bitwise_equal(out[2], params)


def keep_mask_of(target: Target, shapes, dtype=torch.float32, **options):
    """The mask a backend applies, read off a perturbation of w = 0 by g = 1 (every e is then nonzero)."""
    params = [torch.zeros(s, dtype=dtype, device=target.device) for s in shapes]
    grads = [torch.ones_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, backups, scalar(1.0, target), grads=grads, rho=1.0, backend=target.backend,
                 **options)
    return [(p != 0).cpu() for p in params]


@pytest.mark.parametrize("keep_prob", [0.5, 0.1, 0.999])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_are_bit_identical_with_the_contract(kernel, keep_prob, dtype):
    """The mask of the contract (the reference's Philox, itself checked against known answers), whatever
    the dtype, with seeds, steps and tensor indices beyond 32 bits."""
    shapes = [(2 * kernel.chunk + 3,), (7,), (0,), (1000,), (1,)]
    options = dict(keep_prob=keep_prob, seed=2**63 + 123456789012, step=2**33 + 5,
                   tensor_indices=[17, 3, 2**32 - 1, 0, 2**31])
    masks = keep_mask_of(kernel, shapes, dtype, **options)
    expected = [reference.keep_mask(math.prod(s), t, options["seed"], options["step"],
                                    mask_threshold(keep_prob)).view(s)
                for s, t in zip(shapes, options["tensor_indices"])]
    assert_bitwise_equal(masks, expected)
    kept = torch.cat([m.flatten() for m in masks]).float().mean().item()
    n = sum(m.numel() for m in masks)
    assert abs(kept - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n) + 1e-9


def test_mask_depends_on_global_tensor_index_not_on_grouping(any_backend):
    """A tensor's mask follows its global index, whatever the list, dtype group or chunking around it."""
    big = 2 * any_backend.chunk + 3
    options = dict(keep_prob=0.5, seed=5, step=1)
    alone = keep_mask_of(any_backend, [(big,)], tensor_indices=[2], **options)[0]
    device = any_backend.device
    params = [torch.zeros(3, dtype=torch.bfloat16, device=device), torch.zeros(9, device=device),
              torch.zeros(big, device=device)]
    grads = [torch.ones_like(p) for p in params]
    ops.perturb_(params, [torch.empty_like(p) for p in params], scalar(1.0, any_backend), grads=grads,
                 rho=1.0, backend=any_backend.backend, **options)
    assert_bitwise_equal((params[2] != 0).cpu(), alone)
    other_step = keep_mask_of(any_backend, [(big,)], tensor_indices=[2], keep_prob=0.5, seed=5, step=2)
    other_index = keep_mask_of(any_backend, [(big,)], tensor_indices=[1], **options)
    assert not torch.equal(other_step[0], alone) and not torch.equal(other_index[0], alone)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradient_leaves_weights_untouched(any_backend, bad):
    shapes = [(100,), (any_backend.chunk + 5,)]
    params = make_tensors(shapes, torch.float32, device=any_backend.device)
    grads = make_tensors(shapes, torch.float32, 4, device=any_backend.device)
    grads[0][17] = bad
    before = clones(params)
    backups = [torch.empty_like(p) for p in params]
    norm, flag = ops.grad_norm(params, grads, backend=any_backend.backend)
    ops.perturb_(params, backups, norm, grads=grads, rho=0.05, keep_prob=0.5, backend=any_backend.backend)
    assert flag.item() == 1.0
    assert_bitwise_equal(params, before)
    assert_bitwise_equal(backups, before)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan_and_no_perturbation(any_backend, adaptive):
    params = make_tensors([(100,), (7,)], torch.float32, device=any_backend.device)
    grads = [torch.zeros_like(p) for p in params]
    before = clones(params)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, backend=any_backend.backend)
    ops.perturb_(params, [torch.empty_like(p) for p in params], norm, grads=grads, rho=0.05,
                 adaptive=adaptive, backend=any_backend.backend)
    assert norm.item() == 0.0 and flag.item() == 0.0
    assert_bitwise_equal(params, before)


# --------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(any_backend, dtype):
    big = 2 * any_backend.chunk + 3
    shapes = [(0,), (1,), (7,), (big,), (3, 333)]
    backups = make_tensors(shapes, dtype, 1, device=any_backend.device)
    backups[2][3] = math.nan
    backups[3][any_backend.chunk] = -0.0
    params = make_tensors(shapes, dtype, 2, device=any_backend.device)
    ops.restore_(params, backups, backend=any_backend.backend)
    assert_bitwise_equal(params, backups)


# ------------------------------------------------------------------------------------ restore and step


def _sgd(backend, params, backups, grads, buffers, *, multiplier=None, found_inf=None, **options):
    return ops.restore_sgd_step_(params, backups, [b.clone() if b is not None else None for b in buffers],
                                 grads=grads, grad_multiplier=multiplier, found_inf=found_inf,
                                 backend=backend, **options)


SGD_OPTIONS = {
    "plain": {"lr": 0.1},
    "nesterov-wd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True},
    "dampening-maximize": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True},
    "wd-no-momentum": {"lr": 0.05, "weight_decay": 0.01},
}


@pytest.mark.parametrize(*pairwise(dtype=DTYPES, shapes=SHAPE_SETS, options=SGD_OPTIONS,
                                   first_step=[True, False]))
def test_restore_sgd_step_matches_reference(kernel, dtype, shapes, options, first_step):
    shapes = shapes_for(shapes, kernel)
    backups = make_tensors(shapes, dtype, 1, device=kernel.device)
    grads = make_tensors(shapes, dtype, 2, device=kernel.device)
    params = [b + 0.25 for b in backups]
    buffers = [None if first_step else b for b in make_tensors(shapes, dtype, 3, device=kernel.device)]
    multiplier = scalar(0.75, kernel)
    run = lambda b, p, bk, g: _sgd(b, p, bk, g, buffers, multiplier=multiplier, **options)  # noqa: E731
    (out, out_buffers), (ref, ref_buffers) = run_both(kernel, run, params, backups, grads)
    assert_matches(out[0], ref[0], dtype, kernel, "weights")
    if options.get("momentum"):
        assert_matches(out_buffers, ref_buffers, dtype, kernel, "momentum buffers")


ADAM_OPTIONS = {
    "adam-l2": {"lr": 0.01, "weight_decay": 0.1},
    "adamw-amsgrad": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True},
    "maximize-betas": {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
}


def _adam_state(shapes, dtype, step, device):
    exp_avgs = [t.abs() * 0.1 for t in make_tensors(shapes, dtype, 4, device=device)]
    exp_avg_sqs = [t.abs() * 0.01 for t in make_tensors(shapes, dtype, 5, device=device)]
    max_sqs = [v * 1.5 for v in exp_avg_sqs]
    steps = [torch.tensor(float(step), device=device) for _ in shapes]
    return exp_avgs, exp_avg_sqs, max_sqs, steps


def _adam(backend, params, backups, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *, found_inf=None,
          multiplier=None, **options):
    ops.restore_adam_step_(params, backups, exp_avgs, exp_avg_sqs, max_sqs, steps, grads=grads,
                           grad_multiplier=multiplier, found_inf=found_inf, backend=backend, **options)


@pytest.mark.parametrize(*pairwise(dtype=DTYPES, shapes=SHAPE_SETS, options=ADAM_OPTIONS, step=[0, 9]))
def test_restore_adam_step_matches_reference(kernel, dtype, shapes, options, step):
    shapes = shapes_for(shapes, kernel)
    backups = make_tensors(shapes, dtype, 1, device=kernel.device)
    grads = make_tensors(shapes, dtype, 2, device=kernel.device)
    params = [b - 0.5 for b in backups]
    state = _adam_state(shapes, dtype, step, kernel.device)
    run = lambda b, *ls: _adam(b, *ls, multiplier=scalar(1.5, kernel), **options)  # noqa: E731
    (out, _), (ref, _) = run_both(kernel, run, params, backups, grads, *state)
    for name, k, r in zip(["params", "backups", "grads", "exp_avgs", "exp_avg_sqs", "max", "steps"],
                          out, ref):
        assert_close(k, r, dtype, msg=name)
    assert all(s.item() == step + 1 for s in out[6])


@slow_in_the_interpreter()  # NOTE (test time): hundreds of tensors
def test_restore_steps_many_tensors(kernel):
    dtype, device = torch.float32, kernel.device
    backups = make_tensors(MANY_SHAPES, dtype, 1, device=device)
    grads = make_tensors(MANY_SHAPES, dtype, 2, device=device)
    params = [b * 2 for b in backups]
    buffers = make_tensors(MANY_SHAPES, dtype, 3, device=device)
    run = lambda b, p, bk, g: _sgd(b, p, bk, g, buffers, lr=0.1, momentum=0.9)  # noqa: E731
    (out, out_buffers), (ref, ref_buffers) = run_both(kernel, run, params, backups, grads)
    assert_matches(out[0], ref[0], dtype, kernel)
    assert_matches(out_buffers, ref_buffers, dtype, kernel)
    state = _adam_state(MANY_SHAPES, dtype, 3, device)
    run = lambda b, *ls: _adam(b, *ls, lr=0.01, decoupled_weight_decay=True, weight_decay=0.01)  # noqa: E731
    (out, _), (ref, _) = run_both(kernel, run, params, backups, grads, *state)
    assert_close(out[0], ref[0])
    assert_close(out[3], ref[3])


def test_two_steps_of_each_optimizer_match_reference(kernel):
    """State written by one step feeds the next (first-step buffers, advanced Adam counters)."""
    shapes = shapes_for([(3, 5), ("chunk+",), (1,)], kernel)
    backups = make_tensors(shapes, torch.float32, 1, device=kernel.device)
    grads = make_tensors(shapes, torch.float32, 2, device=kernel.device)
    results = {}
    for backend in [kernel.backend, "torch"]:
        params, buffers = clones(backups), [None] * len(shapes)
        for _ in range(2):
            buffers = ops.restore_sgd_step_(params, clones(params), buffers, grads=grads, lr=0.1,
                                            momentum=0.9, dampening=0.1, weight_decay=1e-3, backend=backend)
        state = _adam_state(shapes, torch.float32, 0, kernel.device)
        adam_params = clones(backups)
        for _ in range(2):
            _adam(backend, adam_params, clones(adam_params), grads, *state, lr=0.01, amsgrad=True,
                  decoupled_weight_decay=True, weight_decay=0.01)
        results[backend] = (params, buffers, adam_params, state)
    out, ref = results[kernel.backend], results["torch"]
    assert_matches(out[0], ref[0], torch.float32, kernel)
    assert_matches(out[1], ref[1], torch.float32, kernel)
    assert_close(out[2], ref[2])
    for k, r in zip(out[3], ref[3]):
        assert_close(k, r)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_found_inf_restores_weights_and_keeps_state(any_backend, optimizer):
    device = any_backend.device
    shapes = [(5,), (1000,), (any_backend.chunk + 3,)]
    backups = make_tensors(shapes, torch.float32, 1, device=device)
    grads = make_tensors(shapes, torch.float32, 2, device=device)
    grads[1][4] = math.nan
    params = [b + 1.0 for b in backups]
    found_inf = scalar(1.0, any_backend)
    if optimizer == "sgd":
        buffers = make_tensors(shapes, torch.float32, 3, device=device)
        new_buffers = _sgd(any_backend.backend, params, backups, grads, buffers, found_inf=found_inf,
                           lr=0.1, momentum=0.9)
        assert_bitwise_equal(new_buffers, buffers)
    else:
        state = _adam_state(shapes, torch.float32, 4, device)
        before = [clones(s) for s in state]
        _adam(any_backend.backend, params, backups, grads, *state, found_inf=found_inf, lr=0.1,
              amsgrad=True)
        for s, b in zip(state, before):
            assert_bitwise_equal(s, b)
    assert_bitwise_equal(params, backups)


def test_parameters_without_grad_are_only_restored(any_backend):
    device = any_backend.device
    backups = make_tensors([(4,), (6,)], torch.float32, device=device)
    params = [b + 1 for b in backups]
    grads = [None, torch.ones(6, device=device)]
    ops.restore_sgd_step_(params, backups, [None, None], grads=grads, lr=0.5, backend=any_backend.backend)
    assert_bitwise_equal(params[0], backups[0])
    assert_close(params[1], backups[1] - 0.5)


# ------------------------------------------------------------------------------------------ validation


def test_bad_inputs_raise_errors_naming_the_argument():
    p = [torch.zeros(3), torch.zeros(4)]
    g = [torch.ones(3), torch.ones(4)]
    b = [torch.zeros(3), torch.zeros(4)]
    norm = torch.tensor(1.0)
    cases = [
        (lambda: ops.grad_norm(p, [torch.ones(3)]), "grads"),
        (lambda: ops.grad_norm(p, [torch.ones(3), torch.ones(5)]), r"grads\[1\]: shape"),
        (lambda: ops.grad_norm(p, [torch.ones(3), torch.ones(4, dtype=torch.float16)]), r"grads\[1\]: dtype"),
        (lambda: ops.grad_norm([torch.zeros(3, dtype=torch.int32)]), r"params\[0\]: dtype"),
        (lambda: ops.grad_norm([torch.zeros(3, dtype=torch.complex64)]), r"params\[0\]: complex"),
        (lambda: ops.grad_norm(p, [torch.ones(3).to_sparse(), torch.ones(4)]), r"grads\[0\]: sparse"),
        (lambda: ops.grad_norm([p[0], torch.zeros(4, device="meta")]), r"params\[1\]: on meta"),
        (lambda: ops.grad_norm([torch.zeros(4, 6)[:, ::2]]), r"params\[0\]: a strided view with gaps"),
        (lambda: ops.grad_norm([torch.zeros(4, 3).t()], [torch.ones(3, 4)]), r"grads\[0\]: strides"),
        (lambda: ops.perturb_([torch.zeros(3, 4)], [torch.zeros(4, 3).t()], norm, grads=[torch.ones(3, 4)],
                              rho=0.1), r"backups\[0\]: strides"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, keep_prob=0.0), "keep_prob"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, keep_prob=1.5), "keep_prob"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, scale_factor=float("inf")), "scale_factor"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=-1.0), "rho"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, seed=-1), "seed"),
        (lambda: ops.perturb_(p, b[:1], norm, grads=g, rho=0.1), "backups"),
        (lambda: ops.perturb_(p, b, torch.ones(2), grads=g, rho=0.1), "norm"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, step=torch.tensor(1.0)), "step"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, tensor_indices=[0]), "tensor_indices"),
        (lambda: ops.restore_sgd_step_(p, b, [None, None], grads=g, lr=0.1, nesterov=True), "nesterov"),
        (lambda: ops.restore_sgd_step_(p, b, [None], grads=g, lr=0.1), "momentum_buffers"),
        (lambda: ops.restore_adam_step_(p, b, b, b, None, [torch.tensor(0.0)] * 2, grads=g, lr=0.1,
                                        amsgrad=True), "max_exp_avg_sqs"),
        (lambda: ops.restore_adam_step_(p, b, b, b, None, [torch.tensor(0)] * 2, grads=g, lr=0.1), "steps"),
        (lambda: ops.restore_adam_step_(p, b, b, b, None, [torch.tensor(0.0)] * 2, grads=g, lr=0.1,
                                        betas=(1.0, 0.9)), "betas"),
        (lambda: ops.grad_norm(p, g, backend="cuda-magic"), "unknown backend"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


# ---------------------------------------------------------------------------------------------- layouts


def _channels_last(tensors):
    return [t.clone(memory_format=torch.channels_last) for t in tensors]


def _nhwc(tensors):
    """Contiguous NHWC copies: the elements of the channels_last tensors in the same memory order."""
    return [t.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format) for t in tensors]


def _nchw_view(tensors):
    return [t.permute(0, 3, 1, 2) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_runs_like_contiguous_tensors_in_memory_order(any_backend, dtype):
    """A dense layout is walked in memory order (the mask's element index included): every op on
    channels_last tensors gives, bit for bit, what it gives on contiguous tensors that hold the same
    elements in the same memory order, and the results keep their layout."""
    shapes = [(2, 3, 4, 5), (4, 1, 3, 3), (3, 16, 3, 3)]
    device = any_backend.device
    params, grads, second, buffers = (make_tensors(shapes, dtype, seed, device=device) for seed in range(4))
    exp_avgs, exp_avg_sqs, _, steps = _adam_state(shapes, dtype, 2, device)
    results = {}
    for name, relayout, view in [("channels_last", _channels_last, list), ("nhwc", _nhwc, _nchw_view)]:
        p, g, g2, buf, m, v = (relayout(t) for t in (params, grads, second, buffers, exp_avgs, exp_avg_sqs))
        backups = [torch.empty_like(t) for t in p]
        norm, _ = ops.grad_norm(p, g, backend=any_backend.backend)
        ops.perturb_(p, backups, norm, grads=g, rho=0.1, keep_prob=0.5, seed=7, step=3,
                     backend=any_backend.backend)
        perturbed = clones(p)
        adam_params = clones(p)
        buf = ops.restore_sgd_step_(p, backups, buf, grads=g2, lr=0.1, momentum=0.9, weight_decay=0.01,
                                    backend=any_backend.backend)
        ops.restore_adam_step_(adam_params, backups, m, v, None, clones(steps), grads=g2, lr=0.01,
                               weight_decay=0.1, decoupled_weight_decay=True, backend=any_backend.backend)
        if name == "channels_last":
            for t in p + buf + adam_params + m + v:
                assert t.is_contiguous(memory_format=torch.channels_last)
        results[name] = [norm] + [view(ts) for ts in (perturbed, p, buf, adam_params, m, v)]
    assert_bitwise_equal(results["channels_last"][0], results["nhwc"][0], "norm")
    for what, a, b in zip(["perturbed", "sgd", "momentum", "adam", "exp_avg", "exp_avg_sq"],
                          results["channels_last"][1:], results["nhwc"][1:]):
        assert_bitwise_equal([t.contiguous() for t in a], [t.contiguous() for t in b], what)


def test_masks_follow_memory_order(any_backend):
    """The keep-mask of a channels_last tensor is the contract's mask over its memory order."""
    shape = (2, 3, 4, 4)
    param = torch.zeros(shape, device=any_backend.device).contiguous(memory_format=torch.channels_last)
    grad = torch.ones_like(param)
    norm = torch.tensor(1.0, device=any_backend.device)
    ops.perturb_([param], [torch.empty_like(param)], norm, grads=[grad], rho=1.0, eps=0.0, keep_prob=0.5,
                 scale_factor=1.0, seed=11, step=5,
                 backend=any_backend.backend)
    expected = ops.keep_mask(param.numel(), 0, 11, 5, mask_threshold(0.5)).to(param.device)
    in_memory_order = param.permute(0, 2, 3, 1).reshape(-1) != 0
    assert torch.equal(in_memory_order, expected)


def test_empty_tensors_pair_whatever_their_strides(any_backend):
    """An empty tensor has no memory order to agree on: its companions may have any strides (as
    torch.zeros_like gives an empty strided parameter)."""
    device = any_backend.device
    param = torch.empty_strided((0, 1, 0), (0, 1, 0), device=device)
    empty = [torch.zeros(0, 1, 0, device=device) for _ in range(4)]
    ones, zeros = torch.ones(3, device=device), torch.zeros(3, device=device)
    params = [param, ones.clone()]
    ops.restore_adam_step_(params, [empty[0], ones], [empty[1], zeros.clone()], [empty[2], zeros.clone()],
                           None, [torch.tensor(0.0, device=device) for _ in range(2)],
                           grads=[empty[3], ones], lr=0.1, backend=any_backend.backend)
    assert params[1].ne(1).all()  # the non-empty parameter took its step
