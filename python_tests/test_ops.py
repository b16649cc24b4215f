"""Every op of every kernel backend against the pure-torch reference backend, plus the op layer's checks."""

import math

import pytest
import torch
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels import ops
from sam_kernels.backends import triton_backend

KERNEL_BACKENDS = ["triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MULTI_CHUNK = 2 * triton_backend.CHUNK + 3

# Parameter shapes per case: tensor counts 1, 3 and 300; sizes 0, 1, 7, 1000 and more than one chunk.
SHAPE_SETS = {
    "one-empty": [(0,)],
    "one-scalar": [()],
    "three-odd": [(7,), (1,), (10, 100)],
    "three-with-empty": [(2, 0), (7,), (1000,)],
    "multi-chunk": [(MULTI_CHUNK,), (3, 5)],
}
MANY_SHAPES = [((i * 37) % 50,) for i in range(300)]


def make_tensors(shapes, dtype, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=generator) * scale).to(dtype) for s in shapes]


def clones(tensors):
    return [t.clone() for t in tensors]


def run_both(backend, fn, *tensor_lists):
    """Run ``fn(backend, *lists)`` on fresh clones for ``backend`` and the reference; return both."""
    kernel_lists = [clones(ts) for ts in tensor_lists]
    reference_lists = [clones(ts) for ts in tensor_lists]
    kernel_out = fn(backend, *kernel_lists)
    reference_out = fn("torch", *reference_lists)
    return (kernel_lists, kernel_out), (reference_lists, reference_out)


# ------------------------------------------------------------------------------------------------ norm


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm_matches_reference(backend, dtype, shapes, adaptive):
    params, grads = make_tensors(shapes, dtype, 1), make_tensors(shapes, dtype, 2)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=0.01, backend=backend)
    ref_norm, ref_flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=0.01, backend="torch")
    assert norm.dtype == torch.float32 and norm.shape == () and flag.shape == ()
    assert_close(norm, ref_norm, torch.float32, scale=10)
    assert flag.item() == ref_flag.item() == 0.0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grad_norm_many_tensors_and_mixed_dtypes(backend):
    shapes = MANY_SHAPES[:150]
    params = make_tensors(shapes, torch.float32, 1)[:75] + make_tensors(shapes, torch.bfloat16, 3)[75:]
    grads = [torch.randn_like(p, dtype=torch.float32).to(p.dtype) for p in params]
    norm, _ = ops.grad_norm(params, grads, backend=backend)
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert norm.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grad_norm_is_deterministic_and_skips_missing_grads(backend):
    params = make_tensors([(MULTI_CHUNK,), (33,), (5,)], torch.float32)
    grads = [torch.randn_like(params[0]), None, torch.randn_like(params[2])]
    first, _ = ops.grad_norm(params, grads, backend=backend)
    second, _ = ops.grad_norm(params, grads, backend=backend)
    assert_bitwise_equal(first, second)
    expected = torch.cat([grads[0], grads[2]]).double().norm()
    assert first.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_grad_norm_flags_non_finite(backend, bad):
    params = make_tensors([(10,), (2000,)], torch.float32)
    grads = make_tensors([(10,), (2000,)], torch.float32, 5)
    grads[1][1234] = bad
    _, flag = ops.grad_norm(params, grads, backend=backend)
    assert flag.item() == 1.0


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
def test_grad_norm_without_any_grad_is_zero(backend):
    params = make_tensors([(3,), (4,)], torch.float32)
    norm, flag = ops.grad_norm(params, [None, None], backend=backend)
    assert norm.item() == 0.0 and flag.item() == 0.0


# --------------------------------------------------------------------------------------------- perturb


def _perturb(backend, params, grads, backups, *, norm, **options):
    ops.perturb_(params, backups, norm, grads=grads, backend=backend, **options)


PERTURB_OPTIONS = [
    {"keep_prob": 1.0, "adaptive": False},
    {"keep_prob": 0.5, "adaptive": True, "adaptive_eta": 0.01},
    {"keep_prob": 0.1, "adaptive": False, "normalize": False},
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("options", PERTURB_OPTIONS, ids=["plain", "masked-adaptive", "sparse-mask-usam"])
def test_perturb_matches_reference(backend, dtype, shapes, options):
    params, grads = make_tensors(shapes, dtype, 1), make_tensors(shapes, dtype, 2)
    backups = [torch.full_like(p, 7.0) for p in params]
    norm = torch.tensor(3.5)
    opts = dict(rho=0.5, seed=2**40 + 17, step=3, norm=norm, **options)
    (kernel, _), (reference, _) = run_both(backend, lambda b, *ls: _perturb(b, *ls, **opts),
                                           params, grads, backups)
    assert_bitwise_equal(kernel[2], params, "backup must be the exact pre-step weights")
    assert_bitwise_equal(reference[2], params)
    assert_close(kernel[0], reference[0], dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_perturb_many_tensors(backend):
    params = make_tensors(MANY_SHAPES, torch.float32, 1)
    grads = make_tensors(MANY_SHAPES, torch.float32, 2)
    backups = [torch.empty_like(p) for p in params]
    opts = dict(norm=torch.tensor(2.0), rho=0.1, keep_prob=0.5, adaptive=True, seed=9, step=11)
    (kernel, _), (reference, _) = run_both(backend, lambda b, *ls: _perturb(b, *ls, **opts),
                                           params, grads, backups)
    assert_close(kernel[0], reference[0])
    assert_bitwise_equal(kernel[2], params)


def keep_mask_of(backend, shapes, dtype=torch.float32, **options):
    """The mask a backend applies, read off a perturbation of w = 0 by g = 1 (every e is then nonzero)."""
    params = [torch.zeros(s, dtype=dtype) for s in shapes]
    grads = [torch.ones(s, dtype=dtype) for s in shapes]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, backups, torch.tensor(1.0), grads=grads, rho=1.0, backend=backend, **options)
    return [p != 0 for p in params]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("keep_prob", [0.5, 0.1])
def test_masks_are_bit_identical_across_backends(backend, keep_prob):
    shapes = [(MULTI_CHUNK,), (7,), (0,), (1000,)]
    options = dict(keep_prob=keep_prob, seed=123456789012, step=2**33 + 5)
    kernel = keep_mask_of(backend, shapes, **options)
    reference = keep_mask_of("torch", shapes, **options)
    assert_bitwise_equal(kernel, reference)
    kept = torch.cat([m.flatten() for m in kernel]).float().mean().item()
    n = sum(m.numel() for m in kernel)
    assert abs(kept - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
def test_mask_depends_on_global_tensor_index_not_on_grouping(backend):
    """A tensor's mask follows its global index, whatever the list, dtype group or chunking around it."""
    options = dict(keep_prob=0.5, seed=5, step=1)
    alone = keep_mask_of(backend, [(MULTI_CHUNK,)], tensor_indices=[2], **options)[0]
    params = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(9), torch.zeros(MULTI_CHUNK)]
    grads = [torch.ones_like(p) for p in params]
    ops.perturb_(params, [torch.empty_like(p) for p in params], torch.tensor(1.0), grads=grads, rho=1.0,
                 backend=backend, **options)
    assert_bitwise_equal(params[2] != 0, alone)
    other_step = keep_mask_of(backend, [(MULTI_CHUNK,)], tensor_indices=[2], keep_prob=0.5, seed=5, step=2)
    other_index = keep_mask_of(backend, [(MULTI_CHUNK,)], tensor_indices=[1], **options)
    assert not torch.equal(other_step[0], alone) and not torch.equal(other_index[0], alone)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradient_leaves_weights_untouched(backend, bad):
    params = make_tensors([(100,), (3000,)], torch.float32)
    grads = make_tensors([(100,), (3000,)], torch.float32, 4)
    grads[0][17] = bad
    before = clones(params)
    norm, flag = ops.grad_norm(params, grads, backend=backend)
    ops.perturb_(params, [torch.empty_like(p) for p in params], norm, grads=grads, rho=0.05,
                 keep_prob=0.5, backend=backend)
    assert flag.item() == 1.0
    assert_bitwise_equal(params, before)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan_and_no_perturbation(backend, adaptive):
    params = make_tensors([(100,), (7,)], torch.float32)
    grads = [torch.zeros_like(p) for p in params]
    before = clones(params)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, backend=backend)
    ops.perturb_(params, [torch.empty_like(p) for p in params], norm, grads=grads, rho=0.05,
                 adaptive=adaptive, backend=backend)
    assert norm.item() == 0.0 and flag.item() == 0.0
    assert_bitwise_equal(params, before)


# --------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(backend, dtype):
    shapes = [(0,), (1,), (7,), (MULTI_CHUNK,)]
    backups = make_tensors(shapes, dtype, 1)
    backups[2][3] = math.nan
    params = make_tensors(shapes, dtype, 2)
    ops.restore_(params, backups, backend=backend)
    assert_bitwise_equal(params, backups)


# ------------------------------------------------------------------------------------ restore and step


def _sgd(backend, params, backups, grads, buffers, *, multiplier=None, found_inf=None, **options):
    out = ops.restore_sgd_step_(params, backups, [b.clone() if b is not None else None for b in buffers],
                                grads=grads, grad_multiplier=multiplier, found_inf=found_inf,
                                backend=backend, **options)
    return out


SGD_OPTIONS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True},
    {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True},
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=["plain", "nesterov-wd", "dampening-maximize"])
@pytest.mark.parametrize("first_step", [True, False])
def test_restore_sgd_step_matches_reference(backend, dtype, shapes, options, first_step):
    backups, grads = make_tensors(shapes, dtype, 1), make_tensors(shapes, dtype, 2)
    params = [b + 0.25 for b in backups]
    buffers = [None if first_step else b for b in make_tensors(shapes, dtype, 3)]
    multiplier = torch.tensor(0.75)
    run = lambda b, p, bk, g: _sgd(b, p, bk, g, buffers, multiplier=multiplier, **options)  # noqa: E731
    (kernel, kernel_buffers), (reference, reference_buffers) = run_both(backend, run, params, backups, grads)
    assert_close(kernel[0], reference[0], dtype)
    if options.get("momentum"):
        assert_close(kernel_buffers, reference_buffers, dtype)


ADAM_OPTIONS = [
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True},
    {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
]


def _adam_state(shapes, dtype, step):
    exp_avgs = [t.abs() * 0.1 for t in make_tensors(shapes, dtype, 4)]
    exp_avg_sqs = [t.abs() * 0.01 for t in make_tensors(shapes, dtype, 5)]
    max_sqs = [v * 1.5 for v in exp_avg_sqs]
    steps = [torch.tensor(float(step)) for _ in shapes]
    return exp_avgs, exp_avg_sqs, max_sqs, steps


def _adam(backend, params, backups, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *, found_inf=None,
          multiplier=None, **options):
    ops.restore_adam_step_(params, backups, exp_avgs, exp_avg_sqs, max_sqs, steps, grads=grads,
                           grad_multiplier=multiplier, found_inf=found_inf, backend=backend, **options)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=["adam-l2", "adamw-amsgrad", "maximize-betas"])
@pytest.mark.parametrize("step", [0, 9])
def test_restore_adam_step_matches_reference(backend, dtype, shapes, options, step):
    backups, grads = make_tensors(shapes, dtype, 1), make_tensors(shapes, dtype, 2)
    params = [b - 0.5 for b in backups]
    state = _adam_state(shapes, dtype, step)
    run = lambda b, *ls: _adam(b, *ls, multiplier=torch.tensor(1.5), **options)  # noqa: E731
    (kernel, _), (reference, _) = run_both(backend, run, params, backups, grads, *state)
    for name, k, r in zip(["params", "backups", "grads", "exp_avgs", "exp_avg_sqs", "max", "steps"],
                          kernel, reference):
        assert_close(k, r, dtype, msg=name)
    assert all(s.item() == step + 1 for s in kernel[6])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_restore_steps_many_tensors(backend):
    dtype = torch.float32
    backups, grads = make_tensors(MANY_SHAPES, dtype, 1), make_tensors(MANY_SHAPES, dtype, 2)
    params = [b * 2 for b in backups]
    buffers = make_tensors(MANY_SHAPES, dtype, 3)
    run = lambda b, p, bk, g: _sgd(b, p, bk, g, buffers, lr=0.1, momentum=0.9)  # noqa: E731
    (kernel, kernel_buffers), (reference, reference_buffers) = run_both(backend, run, params, backups, grads)
    assert_close(kernel[0], reference[0])
    assert_close(kernel_buffers, reference_buffers)
    state = _adam_state(MANY_SHAPES, dtype, 3)
    run = lambda b, *ls: _adam(b, *ls, lr=0.01, decoupled_weight_decay=True, weight_decay=0.01)  # noqa: E731
    (kernel, _), (reference, _) = run_both(backend, run, params, backups, grads, *state)
    assert_close(kernel[0], reference[0])
    assert_close(kernel[3], reference[3])


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_found_inf_restores_weights_and_keeps_state(backend, optimizer):
    shapes = [(5,), (1000,), (MULTI_CHUNK,)]
    backups, grads = make_tensors(shapes, torch.float32, 1), make_tensors(shapes, torch.float32, 2)
    grads[1][4] = math.nan
    params = [b + 1.0 for b in backups]
    found_inf = torch.tensor(1.0)
    if optimizer == "sgd":
        buffers = make_tensors(shapes, torch.float32, 3)
        new_buffers = _sgd(backend, params, backups, grads, buffers, found_inf=found_inf, lr=0.1,
                           momentum=0.9)
        assert_bitwise_equal(new_buffers, buffers)
    else:
        state = _adam_state(shapes, torch.float32, 4)
        before = [clones(s) for s in state]
        _adam(backend, params, backups, grads, *state, found_inf=found_inf, lr=0.1, amsgrad=True)
        for s, b in zip(state, before):
            assert_bitwise_equal(s, b)
    assert_bitwise_equal(params, backups)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
def test_parameters_without_grad_are_only_restored(backend):
    backups = make_tensors([(4,), (6,)], torch.float32)
    params = [b + 1 for b in backups]
    grads = [None, torch.ones(6)]
    ops.restore_sgd_step_(params, backups, [None, None], grads=grads, lr=0.5, backend=backend)
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
        (lambda: ops.grad_norm([torch.zeros(3, dtype=torch.float64)]), r"params\[0\]: dtype"),
        (lambda: ops.grad_norm([torch.zeros(3, dtype=torch.complex64)]), r"params\[0\]: complex"),
        (lambda: ops.grad_norm(p, [torch.ones(3).to_sparse(), torch.ones(4)]), r"grads\[0\]: sparse"),
        (lambda: ops.grad_norm([p[0], torch.zeros(4, device="meta")]), r"params\[1\]: on meta"),
        (lambda: ops.grad_norm([torch.zeros(4, 3).t()]), r"params\[0\]: must be contiguous"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, keep_prob=0.0), "keep_prob"),
        (lambda: ops.perturb_(p, b, norm, grads=g, rho=0.1, keep_prob=1.5), "keep_prob"),
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
