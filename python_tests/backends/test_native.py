"""The native backend (sam_kernels._C, csrc/) against the pure-torch reference.

Every test runs on the CPU (the C++ kernels run for real here) and again on CUDA when a GPU is present;
CUDA cases skip cleanly without one. Without the extension every test skips with the reason, unless
``SAM_KERNELS_EXPECT_NATIVE=1``, which turns a missing extension into a failure (CI sets it after building).
``SAM_KERNELS_EXPECT_CUDA=1`` additionally requires the extension's CUDA part (sm_80 and sm_90), and
``SAM_KERNELS_EXPECT_BUILD_TOOL=cmake`` (or ``setuptools``) the build system that made it.

On the CPU the kernels compute in the reference's operation order without FMA contraction, so perturb, the
SGD step and restore match the reference bit for bit; Adam matches to rounding (torch's vectorized sqrt is
not correctly rounded), the norm to summation order. CUDA kernels contract into FMAs: tolerances there.
"""

import math
import os

import pytest
import torch
from known_answers import PHILOX_KAT
from tolerance import assert_bitwise_equal, assert_close

from benchmarks.shapes import resnet50_shapes
from sam_kernels import backends, ops
from sam_kernels.backends import native_backend, reference
from sam_kernels.backends.common import mask_threshold

EXPECT_NATIVE = os.environ.get("SAM_KERNELS_EXPECT_NATIVE") == "1"
EXPECT_CUDA = os.environ.get("SAM_KERNELS_EXPECT_CUDA") == "1"
EXPECT_BUILD_TOOL = os.environ.get("SAM_KERNELS_EXPECT_BUILD_TOOL", "")
BUILT = native_backend.is_built()
INFO = native_backend.build_info()
CHUNK = 65536  # csrc/include/sam_kernels/elementwise.h: kChunkSize (checked against the build below)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MULTI_CHUNK = CHUNK + 3
# Tensor counts 1, 3 and 300; sizes 0, 1, 7, 1000 and more than one chunk.
SHAPE_SETS = {
    "one-empty": [(0,)],
    "one-scalar": [()],
    "one-7": [(7,)],
    "one-1000": [(10, 100)],
    "one-multi-chunk": [(MULTI_CHUNK,)],
    "three-odd": [(7,), (1,), (10, 100)],
    "three-with-empty": [(2, 0), (7,), (1000,)],
    "three-multi-chunk": [(3, 5), (MULTI_CHUNK,), (1,)],
    "three-hundred": [((i * 37) % 50,) for i in range(299)] + [(CHUNK + 1,)],
}


def _require_native(cuda: bool = False) -> None:
    if not BUILT:
        if EXPECT_NATIVE:
            pytest.fail(f"SAM_KERNELS_EXPECT_NATIVE=1 but {INFO['error']}")
        pytest.skip(f"native extension unavailable: {INFO['error']}")
    if cuda and not INFO["cuda"]:
        if EXPECT_CUDA:
            pytest.fail("SAM_KERNELS_EXPECT_CUDA=1 but sam_kernels._C was built without its CUDA part")
        pytest.skip("sam_kernels._C was built without its CUDA part")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def device(request):
    _require_native(cuda=request.param == "cuda")
    return torch.device(request.param)


@pytest.fixture
def native():
    _require_native()


def exact(device) -> bool:
    """Whether the native kernels match the reference bit for bit on this device (no FMA contraction)."""
    return device.type == "cpu"


def make_tensors(shapes, dtype, seed=0, scale=1.0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=generator) * scale).to(dtype).to(device) for s in shapes]


def clones(tensors):
    return [t.clone() for t in tensors]


def run_both(fn, *tensor_lists):
    """``fn(backend, *lists)`` on fresh clones for the native backend and for the reference."""
    native_lists = [clones(ts) for ts in tensor_lists]
    reference_lists = [clones(ts) for ts in tensor_lists]
    native_out = fn("native", *native_lists)
    reference_out = fn("torch", *reference_lists)
    return (native_lists, native_out), (reference_lists, reference_out)


def assert_matches(actual, expected, dtype, device, msg=""):
    if exact(device):
        assert_bitwise_equal(actual, expected, msg)
    else:
        assert_close(actual, expected, dtype, msg=msg)


# ------------------------------------------------------------------------------------ build and registry


def test_extension_build_info(native):
    assert INFO["built"] and INFO["build_tool"] in {"setuptools", "cmake"}
    from sam_kernels import _C

    assert CHUNK == _C.CHUNK_SIZE
    if EXPECT_BUILD_TOOL:
        assert INFO["build_tool"] == EXPECT_BUILD_TOOL, f"the extension under test came from {INFO['path']}"
    if EXPECT_CUDA:
        assert INFO["cuda"], "SAM_KERNELS_EXPECT_CUDA=1 but the extension has no CUDA part"
        assert {"sm_80", "sm_90"} <= set(INFO["cuda_archs"]), INFO["cuda_archs"]
    if INFO["cuda"]:
        assert INFO["cuda_archs"] and INFO["cuda_version"]
    assert "native extension sam_kernels._C: built with" in backends.report()


def test_auto_picks_native_on_cpu(native, monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert backends.resolve(torch.device("cpu"))[0] == "native"
    monkeypatch.setenv(backends.BACKEND_ENV, "torch")
    assert backends.resolve(torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv(backends.BACKEND_ENV, "native")
    assert backends.resolve(torch.device("cpu"))[0] == "native"


def test_native_without_cuda_part_is_a_clear_error_on_cuda(native, monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    if INFO["cuda"]:
        assert backends.resolve(torch.device("cuda"))[0] == "native"
        return
    with pytest.raises(RuntimeError, match="without its CUDA part"):
        backends.resolve(torch.device("cuda"), "native")
    assert backends.resolve(torch.device("cuda"))[0] in {"triton", "torch"}


def test_missing_extension_gives_a_clear_message(monkeypatch):
    """Runs with or without the extension: pretend it is absent."""
    monkeypatch.setattr(native_backend, "_C", None)
    monkeypatch.setattr(native_backend, "_LOAD_ERROR", "the extension sam_kernels._C is not built")
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert backends.resolve(torch.device("cpu"))[0] == "torch"
    with pytest.raises(RuntimeError, match=r"not built.*pip install --no-build-isolation"):
        backends.resolve(torch.device("cpu"), "native")
    with pytest.raises(RuntimeError, match="not built"):
        native_backend.restore_([torch.zeros(1)], [torch.zeros(1)])
    assert "is not built" in native_backend.describe()


# --------------------------------------------------------------------------------------------- Philox



@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_known_answers(native, counter, key, expected):
    words = native_backend.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(words[0].tolist()) == expected


def test_philox_matches_the_reference(native):
    generator = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (4096, 4), generator=generator, dtype=torch.int64)
    for key in [(0, 0), (0xDEADBEEF, 0x12345678), (2**32 - 1, 1)]:
        words = native_backend.philox4x32_10(counters, key)
        expected = reference.philox4x32_10(counters.unbind(1), key)
        assert torch.equal(words, torch.stack(expected, 1))


# ---------------------------------------------------------------------------------------------- norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm_matches_reference(device, dtype, shapes, adaptive):
    params = make_tensors(shapes, dtype, 1, device=device)
    grads = make_tensors(shapes, dtype, 2, device=device)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=0.01, backend="native")
    ref_norm, ref_flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=0.01, backend="torch")
    assert norm.dtype == torch.float32 and norm.shape == () and flag.shape == ()
    assert norm.device == device and flag.device == device
    assert_close(norm, ref_norm, torch.float32, scale=10)
    assert flag.item() == ref_flag.item() == 0.0


def test_grad_norm_is_deterministic_across_thread_counts(device):
    shapes = [(MULTI_CHUNK,), (33,), (5 * CHUNK + 1,)]
    params = make_tensors(shapes, torch.float32, 1, device=device)
    grads = make_tensors(shapes, torch.float32, 2, device=device)
    first, _ = ops.grad_norm(params, grads, backend="native")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = ops.grad_norm(params, grads, backend="native")
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(first, single)
    expected = torch.cat([g.flatten() for g in grads]).double().norm()
    assert first.item() == pytest.approx(expected.item(), rel=1e-6)


def test_grad_norm_mixed_dtypes(device):
    shapes = [((i * 37) % 50 + 1,) for i in range(120)]
    dtypes = [DTYPES[i % 3] for i in range(len(shapes))]
    grads = [g.to(d) for g, d in zip(make_tensors(shapes, torch.float32, 3, device=device), dtypes)]
    params = [g.clone() for g in grads]
    norm, _ = ops.grad_norm(params, grads, backend="native")
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert norm.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_grad_norm_flags_non_finite(device, bad):
    grads = make_tensors([(10,), (MULTI_CHUNK,)], torch.float32, 5, device=device)
    grads[1][CHUNK + 1] = bad
    _, flag = ops.grad_norm(clones(grads), grads, backend="native")
    assert flag.item() == 1.0


def test_grad_norm_flags_overflowing_squares(device):
    grads = [torch.full((4,), 3e38, device=device)]
    _, flag = ops.grad_norm(clones(grads), grads, backend="native")
    assert flag.item() == 1.0


# --------------------------------------------------------------------------------------------- perturb

PERTURB_OPTIONS = {
    "plain": {"keep_prob": 1.0, "adaptive": False},
    "plain-adaptive": {"keep_prob": 1.0, "adaptive": True, "adaptive_eta": 0.01},
    "half-mask-adaptive": {"keep_prob": 0.5, "adaptive": True, "adaptive_eta": 0.01},
    "sparse-mask-usam": {"keep_prob": 0.1, "adaptive": False, "normalize": False},
}


def _perturb(backend, params, grads, backups, *, norm, **options):
    ops.perturb_(params, backups, norm, grads=grads, backend=backend, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("options", PERTURB_OPTIONS.values(), ids=PERTURB_OPTIONS.keys())
def test_perturb_matches_reference(device, dtype, shapes, options):
    params = make_tensors(shapes, dtype, 1, device=device)
    grads = make_tensors(shapes, dtype, 2, device=device)
    backups = [torch.full_like(p, 7.0) for p in params]
    opts = dict(rho=0.5, seed=2**40 + 17, step=2**32 + 3, norm=torch.tensor(3.5, device=device), **options)
    (kernel, _), (ref, _) = run_both(lambda b, *ls: _perturb(b, *ls, **opts), params, grads, backups)
    assert_bitwise_equal(kernel[2], params, "backup must be the exact pre-step weights")
    assert_matches(kernel[0], ref[0], dtype, device, "perturbed weights")


def keep_mask_of(backend, shapes, device, dtype=torch.float32, **options):
    """The mask a backend applies, read off a perturbation of w = 0 by g = 1 (every e is then nonzero)."""
    params = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    grads = [torch.ones_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, backups, torch.tensor(1.0, device=device), grads=grads, rho=1.0, backend=backend,
                 **options)
    return [(p != 0).cpu() for p in params]


@pytest.mark.parametrize("keep_prob", [0.5, 0.1, 0.999])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_are_bit_identical_with_the_reference(device, keep_prob, dtype):
    shapes = [(MULTI_CHUNK,), (7,), (0,), (1000,), (1,)]
    options = dict(keep_prob=keep_prob, seed=2**63 + 123456789012, step=2**33 + 5,
                   tensor_indices=[17, 3, 2**32 - 1, 0, 2**31])
    kernel = keep_mask_of("native", shapes, device, dtype, **options)
    expected = [reference.keep_mask(math.prod(s), t, options["seed"], options["step"],
                                    mask_threshold(keep_prob)).view(s)
                for s, t in zip(shapes, options["tensor_indices"])]
    assert_bitwise_equal(kernel, expected)
    kept = torch.cat([m.flatten() for m in kernel]).float().mean().item()
    n = sum(m.numel() for m in kernel)
    assert abs(kept - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n) + 1e-9


def test_mask_depends_on_global_tensor_index_not_on_grouping(device):
    options = dict(keep_prob=0.5, seed=5, step=1)
    alone = keep_mask_of("native", [(MULTI_CHUNK,)], device, tensor_indices=[2], **options)[0]
    params = [torch.zeros(3, dtype=torch.bfloat16, device=device), torch.zeros(9, device=device),
              torch.zeros(MULTI_CHUNK, device=device)]
    grads = [torch.ones_like(p) for p in params]
    ops.perturb_(params, [torch.empty_like(p) for p in params], torch.tensor(1.0, device=device),
                 grads=grads, rho=1.0, backend="native", **options)
    assert_bitwise_equal((params[2] != 0).cpu(), alone)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradient_leaves_weights_untouched(device, bad):
    params = make_tensors([(100,), (MULTI_CHUNK,)], torch.float32, device=device)
    grads = make_tensors([(100,), (MULTI_CHUNK,)], torch.float32, 4, device=device)
    grads[0][17] = bad
    before = clones(params)
    backups = [torch.empty_like(p) for p in params]
    norm, flag = ops.grad_norm(params, grads, backend="native")
    ops.perturb_(params, backups, norm, grads=grads, rho=0.05, keep_prob=0.5, backend="native")
    assert flag.item() == 1.0
    assert_bitwise_equal(params, before)
    assert_bitwise_equal(backups, before)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan_and_no_perturbation(device, adaptive):
    params = make_tensors([(100,), (7,)], torch.float32, device=device)
    grads = [torch.zeros_like(p) for p in params]
    before = clones(params)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, backend="native")
    ops.perturb_(params, [torch.empty_like(p) for p in params], norm, grads=grads, rho=0.05,
                 adaptive=adaptive, backend="native")
    assert norm.item() == 0.0 and flag.item() == 0.0
    assert_bitwise_equal(params, before)


# --------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(device, dtype):
    shapes = [(0,), (1,), (7,), (MULTI_CHUNK,), (3, 333)]
    backups = make_tensors(shapes, dtype, 1, device=device)
    backups[2][3] = math.nan
    backups[3][CHUNK] = -0.0
    params = make_tensors(shapes, dtype, 2, device=device)
    ops.restore_(params, backups, backend="native")
    assert_bitwise_equal(params, backups)


# ------------------------------------------------------------------------------------ restore and step

SGD_OPTIONS = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "nesterov-wd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True},
    "dampening-maximize": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True},
    "wd-no-momentum": {"lr": 0.05, "weight_decay": 0.01},
}


def _sgd(backend, params, backups, grads, buffers, *, multiplier=None, found_inf=None, **options):
    return ops.restore_sgd_step_(params, backups, [b.clone() if b is not None else None for b in buffers],
                                 grads=grads, grad_multiplier=multiplier, found_inf=found_inf,
                                 backend=backend, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("options", SGD_OPTIONS.values(), ids=SGD_OPTIONS.keys())
@pytest.mark.parametrize("first_step", [True, False])
def test_restore_sgd_step_matches_reference(device, dtype, shapes, options, first_step):
    backups = make_tensors(shapes, dtype, 1, device=device)
    grads = make_tensors(shapes, dtype, 2, device=device)
    params = [b + 0.25 for b in backups]
    buffers = [None if first_step else b for b in make_tensors(shapes, dtype, 3, device=device)]
    multiplier = torch.tensor(0.75, device=device) if first_step else None
    run = lambda b, p, bk, g: _sgd(b, p, bk, g, buffers, multiplier=multiplier, **options)  # noqa: E731
    (kernel, kernel_buffers), (ref, ref_buffers) = run_both(run, params, backups, grads)
    assert_matches(kernel[0], ref[0], dtype, device, "params")
    if options.get("momentum"):
        assert_matches(kernel_buffers, ref_buffers, dtype, device, "momentum buffers")


ADAM_OPTIONS = {
    "adam": {"lr": 0.01},
    "adam-l2": {"lr": 0.01, "weight_decay": 0.1},
    "adamw-amsgrad": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True},
    "adam-amsgrad": {"lr": 0.01, "amsgrad": True},
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("options", ADAM_OPTIONS.values(), ids=ADAM_OPTIONS.keys())
@pytest.mark.parametrize("step", [0, 9])
def test_restore_adam_step_matches_reference(device, dtype, shapes, options, step):
    backups = make_tensors(shapes, dtype, 1, device=device)
    grads = make_tensors(shapes, dtype, 2, device=device)
    params = [b - 0.5 for b in backups]
    state = _adam_state(shapes, dtype, step, device)
    multiplier = torch.tensor(1.5, device=device) if step else None
    run = lambda b, *ls: _adam(b, *ls, multiplier=multiplier, **options)  # noqa: E731
    (kernel, _), (ref, _) = run_both(run, params, backups, grads, *state)
    names = ["params", "backups", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"]
    for name, k, r in zip(names, kernel, ref):
        assert_close(k, r, dtype, msg=name)
    assert all(s.item() == step + 1 for s in kernel[6])


def test_two_steps_of_each_optimizer_match_reference(device):
    """State written by one step feeds the next (first-step buffers, advanced Adam counters)."""
    shapes = SHAPE_SETS["three-multi-chunk"]
    backups = make_tensors(shapes, torch.float32, 1, device=device)
    grads = make_tensors(shapes, torch.float32, 2, device=device)
    results = {}
    for backend in ["native", "torch"]:
        params, buffers = clones(backups), [None] * len(shapes)
        for _ in range(2):
            buffers = ops.restore_sgd_step_(params, clones(params), buffers, grads=grads, lr=0.1,
                                            momentum=0.9, dampening=0.1, weight_decay=1e-3, backend=backend)
        state = _adam_state(shapes, torch.float32, 0, device)
        adam_params = clones(backups)
        for _ in range(2):
            _adam(backend, adam_params, clones(adam_params), grads, *state, lr=0.01, amsgrad=True,
                  decoupled_weight_decay=True, weight_decay=0.01)
        results[backend] = (params, buffers, adam_params, state)
    native, ref = results["native"], results["torch"]
    assert_matches(native[0], ref[0], torch.float32, device)
    assert_matches(native[1], ref[1], torch.float32, device)
    assert_close(native[2], ref[2])
    for k, r in zip(native[3], ref[3]):
        assert_close(k, r)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_restores_weights_and_keeps_state(device, optimizer, found):
    shapes = [(5,), (1000,), (MULTI_CHUNK,)]
    backups = make_tensors(shapes, torch.float32, 1, device=device)
    grads = make_tensors(shapes, torch.float32, 2, device=device)
    if found:
        grads[1][4] = math.nan
    params = [b + 1.0 for b in backups]
    found_inf = torch.tensor(found, device=device)
    if optimizer == "sgd":
        buffers = make_tensors(shapes, torch.float32, 3, device=device)
        run = lambda b, *ls: _sgd(b, *ls, buffers, found_inf=found_inf, lr=0.1, momentum=0.9)  # noqa: E731
        (kernel, kernel_buffers), (ref, ref_buffers) = run_both(run, params, backups, grads)
        assert_matches(kernel_buffers, ref_buffers, torch.float32, device)
        if found:
            assert_bitwise_equal(kernel_buffers, buffers)
    else:
        state = _adam_state(shapes, torch.float32, 4, device)
        run = lambda b, *ls: _adam(b, *ls, found_inf=found_inf, lr=0.1, amsgrad=True)  # noqa: E731
        (kernel, _), (ref, _) = run_both(run, params, backups, grads, *state)
        for k, r in zip(kernel[3:], ref[3:]):
            assert_close(k, r)
        if found:
            for k, s in zip(kernel[3:], state):
                assert_bitwise_equal(k, s)
    if found:
        assert_bitwise_equal(kernel[0], backups)
    else:
        assert_close(kernel[0], ref[0])


# ------------------------------------------------------------------------------------------ large case


def test_resnet50_sam_iteration_matches_reference(device):
    shapes = resnet50_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032
    params = make_tensors(shapes, torch.float32, 1, device=device)
    first = make_tensors(shapes, torch.float32, 2, scale=1e-3, device=device)
    second = make_tensors(shapes, torch.float32, 3, scale=1e-3, device=device)
    results = {}
    for backend in ["native", "torch"]:
        weights, backups = clones(params), [torch.empty_like(p) for p in params]
        norm, flag = ops.grad_norm(weights, first, backend=backend)
        ops.perturb_(weights, backups, norm, grads=first, rho=0.05, backend=backend)
        perturbed = [w.clone() for w in weights[::20]]
        buffers = ops.restore_sgd_step_(weights, backups, [None] * len(shapes), grads=second, lr=0.1,
                                        momentum=0.9, weight_decay=5e-4, backend=backend)
        results[backend] = (norm, flag, perturbed, backups, weights, buffers)
        del weights, backups, buffers
    native, ref = results["native"], results["torch"]
    assert_close(native[0], ref[0])
    assert native[1].item() == ref[1].item() == 0.0
    assert_bitwise_equal(native[3], params, "backups")
    if exact(device):
        # The same norm tensor would make these bitwise; the norms differ by summation order only.
        assert_close(native[2], ref[2], scale=2)
    else:
        assert_close(native[2], ref[2])
    assert_close(native[4], ref[4])
    assert_close(native[5], ref[5])


# ------------------------------------------------------------------------------------- opcheck, compile


def _opcheck_cases(device):
    shapes = [(7,), (3, 5), (MULTI_CHUNK,)]
    p = make_tensors(shapes, torch.float32, 1, device=device)
    g = make_tensors(shapes, torch.float32, 2, device=device)
    mixed = [p[0].to(torch.bfloat16), p[1], p[2].to(torch.float16)]
    mixed_g = [g[0].to(torch.bfloat16), g[1], g[2].to(torch.float16)]
    b = [torch.empty_like(t) for t in p]
    norm = torch.tensor(2.0, device=device)
    step = torch.tensor(3, dtype=torch.int64, device=device)
    scalar = torch.tensor(0.5, device=device)
    steps = [torch.tensor(2.0, device=device) for _ in p]
    ops_ = torch.ops.sam_kernels
    return {
        "grad_norm": (ops_.grad_norm.default, (g, [], 0.0)),
        "grad_norm_adaptive": (ops_.grad_norm.default, (mixed_g, mixed, 0.01)),
        "perturb_": (ops_.perturb_.default, (p, g, b, [0, 5, 9], norm, step, 0.05, 1e-12,
                                             mask_threshold(0.5), 0.5, True, True, 0.0, 1, 2)),
        "perturb_mixed": (ops_.perturb_.default, (mixed, mixed_g, clones(mixed), [0, 1, 2], norm, step, 0.05,
                                                  1e-12, 1 << 24, 1.0, False, False, 0.0, 0, 0)),
        "restore_": (ops_.restore_.default, (p, b)),
        "restore_sgd_step_": (ops_.restore_sgd_step_.default,
                              (p, b, g, clones(g), [1, 0, 0], 0.1, 0.9, 0.0, 1e-4, True, False, scalar,
                               torch.tensor(0.0, device=device))),
        "restore_sgd_step_plain": (ops_.restore_sgd_step_.default,
                                   (p, b, g, [], [0, 0, 0], 0.1, 0.0, 0.0, 0.0, False, True, None, None)),
        "restore_adam_step_": (ops_.restore_adam_step_.default,
                               (p, b, g, clones(g), [x.abs() for x in g], [x.abs() for x in g], steps, 1e-3,
                                0.9, 0.999, 1e-8, 0.01, True, True, False, scalar, None)),
        "restore_adam_step_plain": (ops_.restore_adam_step_.default,
                                    (p, b, g, clones(g), [x.abs() for x in g], [], steps, 1e-3, 0.9, 0.999,
                                     1e-8, 0.0, False, False, True, None, None)),
        "philox4x32_10": (ops_.philox4x32_10.default,
                          (torch.randint(0, 2**32, (16, 4), dtype=torch.int64), 3, 4)),
    }


OPCHECK_NAMES = ["grad_norm", "grad_norm_adaptive", "perturb_", "perturb_mixed", "restore_",
                 "restore_sgd_step_", "restore_sgd_step_plain", "restore_adam_step_",
                 "restore_adam_step_plain", "philox4x32_10"]


@pytest.mark.parametrize("case", OPCHECK_NAMES)
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    if case == "philox4x32_10" and device.type != "cpu":
        pytest.skip("the Philox op is checked on the host build")
    torch.library.opcheck(op, args)


def test_torch_compile_traces_the_ops(device):
    shapes = [(7,), (3, 5)]
    params = make_tensors(shapes, torch.float32, 1, device=device)
    grads = make_tensors(shapes, torch.float32, 2, device=device)
    step = torch.tensor(4, dtype=torch.int64, device=device)

    def sam_step(weights, backups, buffers):
        norm, _ = ops.grad_norm(weights, grads, backend="native")
        ops.perturb_(weights, backups, norm, grads=grads, rho=0.05, keep_prob=0.5, step=step,
                     backend="native")
        ops.restore_sgd_step_(weights, backups, buffers, grads=grads, lr=0.1, momentum=0.9,
                              backend="native")
        return norm

    compiled = torch.compile(sam_step, backend="aot_eager", fullgraph=True)
    weights, backups, buffers = clones(params), [torch.empty_like(p) for p in params], clones(grads)
    eager_weights, eager_buffers = clones(params), clones(grads)
    norm = compiled(weights, backups, buffers)
    expected = sam_step(eager_weights, [torch.empty_like(p) for p in params], eager_buffers)
    assert_bitwise_equal(norm, expected)
    assert_bitwise_equal(weights, eager_weights)
    assert_bitwise_equal(buffers, eager_buffers)


# ---------------------------------------------------------------------------------------- CUDA specifics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_ops_run_on_the_current_stream_of_the_tensors_device():
    """Kernels follow the tensors' device (device guard) and the current stream (no default-stream work)."""
    _require_native(cuda=True)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    params = make_tensors([(MULTI_CHUNK,), (9,)], torch.float32, 1, device=device)
    grads = make_tensors([(MULTI_CHUNK,), (9,)], torch.float32, 2, device=device)
    backups = [torch.empty_like(p) for p in params]
    before = clones(params)
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.device(0), torch.cuda.stream(side):
        norm, _ = ops.grad_norm(params, grads, backend="native")
        ops.perturb_(params, backups, norm, grads=grads, rho=0.05, backend="native")
        ops.restore_(params, backups, backend="native")
    side.synchronize()
    ref_norm, _ = ops.grad_norm(before, grads, backend="torch")
    assert_close(norm, ref_norm)
    assert_bitwise_equal(params, before)
