"""What is particular to the native backend (sam_kernels._C, csrc/): build facts, the registry, the C++
Philox, thread-count determinism, ResNet-50's full size, opcheck and tracing, CUDA streams. Every op
against the reference runs for every backend in python_tests/test_ops.py.

Every test runs on the CPU (the C++ kernels run for real here) and again on CUDA when a GPU is present;
CUDA cases skip cleanly without one. A missing extension (or CUDA part) skips or fails as targets.py says:
``SAM_KERNELS_EXPECT_NATIVE=1`` turns a missing extension into a failure (CI sets it after building),
``SAM_KERNELS_EXPECT_CUDA=1`` additionally requires the extension's CUDA part (sm_80 and sm_90), and
``SAM_KERNELS_EXPECT_BUILD_TOOL=cmake`` (or ``setuptools``) the build system that made it.

On the CPU the kernels compute in the reference's operation order without FMA contraction, so perturb, the
SGD step and restore match the reference bit for bit; Adam matches to rounding (torch's vectorized sqrt is
not correctly rounded), the norm to summation order. CUDA kernels contract into FMAs: tolerances there.
"""

import math

import pytest
import torch
from known_answers import PHILOX_KAT
from targets import EXPECT_BUILD_TOOL, EXPECT_CUDA, NATIVE_CHUNK, require
from tensors import clones, make_tensors, randn64
from tolerance import assert_bitwise_equal, assert_close

from benchmarks.shapes import resnet50_shapes
from sam_kernels import backends, ops
from sam_kernels.backends import native_backend, reference
from sam_kernels.backends.common import AdamConfig, SgdConfig, mask_threshold

BUILT = native_backend.is_built()
INFO = native_backend.build_info()
CHUNK = NATIVE_CHUNK  # csrc/include/sam_kernels/elementwise.h: kChunkSize (checked against the build below)

MULTI_CHUNK = CHUNK + 3


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def device(request):
    return require("native", request.param)


@pytest.fixture
def native():
    require("native")


def exact(device) -> bool:
    """Whether the native kernels match the reference bit for bit on this device (no FMA contraction)."""
    return device.type == "cpu"


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
# (Every op against the reference, on every backend: python_tests/test_ops.py.)


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


# ------------------------------------------------------------------------------------------ large case


@pytest.mark.slow  # 25.6M parameters through both backends, several seconds
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
                              (p, b, g, clones(g), [1, 0, 0], [0.1, 0.9, 0.0, 1e-4, 1.0, 0.0], scalar,
                               torch.tensor(0.0, device=device))),
        "restore_sgd_step_plain": (ops_.restore_sgd_step_.default,
                                   (p, b, g, [], [0, 0, 0], [0.1, 0.0, 0.0, 0.0, 0.0, 1.0], None, None)),
        "restore_adam_step_": (ops_.restore_adam_step_.default,
                               (p, b, g, clones(g), [x.abs() for x in g], [x.abs() for x in g], steps,
                                [1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0, 1.0, 0.0], scalar, None)),
        "restore_adam_step_plain": (ops_.restore_adam_step_.default,
                                    (p, b, g, clones(g), [x.abs() for x in g], [], steps,
                                     [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 1.0], None, None)),
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
    require("native", "cuda")
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


# ------------------------------------------------------------------- float64 and strided dense layouts
# NOTE: these call the registered ops torch.ops.sam_kernels.* directly (argument order as in
# native_backend.py), so they test the extension's own checks and kernels whatever the op layer accepts.
# The expected values are plain torch code written from the definitions: float64 element math for float64
# tensors (the norm and the perturbation scale fp32 for every dtype, csrc/include/sam_kernels/elementwise.h,
# NOTE (fp64 norm)), torch.optim's own float64 steps for the updates, and for layouts the tensor's memory
# taken as a flat array (csrc/checks.h, NOTE (layout)).

KEEP_ALL = 1 << 24
SHAPES = [(MULTI_CHUNK,), (33,), (7, 5)]


def _sam_ops():
    return torch.ops.sam_kernels


def memory_order(tensor):
    """A 1-D view of a dense tensor's elements in the order they lie in memory."""
    return tensor.as_strided((tensor.numel(),), (1,))


def fills_its_memory(tensor) -> bool:
    """Whether the elements occupy numel consecutive slots, each once (non-overlapping and dense)."""
    expected = 1
    dims = sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride(), strict=True) if sz > 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def keep_bits(numel, tensor_index, seed, step, threshold):
    """The mask contract from the Philox op: element i kept iff (word0 >> 8) < threshold."""
    element = torch.arange(numel, dtype=torch.int64)
    counters = torch.stack([element, torch.full_like(element, tensor_index),
                            torch.full_like(element, step & 0xFFFFFFFF),
                            torch.full_like(element, step >> 32)], 1)
    words = _sam_ops().philox4x32_10(counters, seed & 0xFFFFFFFF, seed >> 32)
    return (words[:, 0] >> 8) < threshold


def call_perturb(params, grads, backups, indices, norm, *, step=0, rho=0.05, eps=1e-12, keep_prob=1.0,
                 scale_factor=1.0, normalize=True, adaptive=False, eta=0.0, seed=0):
    step = torch.tensor(step, dtype=torch.int64)
    _sam_ops().perturb_(params, grads, backups, indices, norm, step, rho, eps, mask_threshold(keep_prob),
                        scale_factor, normalize, adaptive, eta, seed & 0xFFFFFFFF, seed >> 32)


def fp32_scale(norm, rho, eps, scale_factor):
    """rho / (norm + eps) * scale_factor as the kernels compute it: fp32 operations, reciprocal first."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return (f32(1.0) / (norm.float() + f32(eps))) * f32(rho) * f32(scale_factor)


def test_fp64_norm_is_the_fp32_norm_of_the_rounded_elements(native):
    grads, weights = randn64(SHAPES, 2), randn64(SHAPES, 1)
    for ws, eta in [([], 0.0), (weights, 0.01)]:
        norm, flag = _sam_ops().grad_norm(grads, ws, eta)
        assert norm.dtype == torch.float32 and flag.item() == 0.0
        rounded, _ = _sam_ops().grad_norm([g.float() for g in grads], [w.float() for w in ws], eta)
        assert_bitwise_equal(norm, rounded)  # the same fp32 terms, summed in the same order
        terms = [g.float().double() * ((w.float().double().abs() + eta) if ws else 1.0)
                 for g, w in zip(grads, weights, strict=True)]
        assert norm.item() == pytest.approx(torch.cat([t.flatten() for t in terms]).norm().item(), rel=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("keep_prob", [1.0, 0.5])
def test_fp64_perturb_computes_in_double(native, adaptive, keep_prob):
    params, grads = randn64(SHAPES, 1), randn64(SHAPES, 2, scale=1e-2)
    norm = torch.tensor(0.7, dtype=torch.float32)
    weights, backups = clones(params), [torch.full_like(p, float("nan")) for p in params]
    indices, seed, step, eta = [0, 4, 9], 2**40 + 7, 2**33 + 5, 0.01
    call_perturb(weights, grads, backups, indices, norm, step=step, keep_prob=keep_prob,
                 scale_factor=1 / keep_prob, adaptive=adaptive, eta=eta, seed=seed)
    assert_bitwise_equal(backups, params)
    scale = fp32_scale(norm, 0.05, 1e-12, 1 / keep_prob).double()
    for w, p, g, index in zip(weights, params, grads, indices, strict=True):
        e = scale * g
        if adaptive:
            t = p.abs() + eta
            e = e * t * t
        if keep_prob < 1:
            keep = keep_bits(p.numel(), index, seed, step, mask_threshold(keep_prob)).view_as(p)
            assert 0.4 < keep.double().mean().item() < 0.6 or p.numel() < 100
            e = torch.where(keep, e, torch.zeros_like(e))
        assert w.dtype == torch.float64
        assert_bitwise_equal(w, p + e)  # no FMA on the CPU: the double operations above, bit for bit


def test_fp64_restore_and_skipped_steps_keep_every_bit(native):
    params = randn64(SHAPES, 1)
    params[1][3] = float("nan")
    backups, weights = clones(params), randn64(SHAPES, 5)
    _sam_ops().restore_(weights, backups)
    assert_bitwise_equal(weights, params)
    grads, buffers = randn64(SHAPES, 2), randn64(SHAPES, 3)
    before = clones(buffers)
    weights = randn64(SHAPES, 5)
    _sam_ops().restore_sgd_step_(weights, backups, grads, buffers, [0, 0, 0],
                                 [0.1, 0.9, 0.0, 0.0, 0.0, 0.0], None, torch.tensor(1.0))
    assert_bitwise_equal(weights, params)
    assert_bitwise_equal(buffers, before)


SGD_CASES = {
    "plain": dict(momentum=0.0),
    "momentum_decay": dict(momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "nesterov_maximize": dict(momentum=0.9, nesterov=True, maximize=True),
    "multiplier": dict(momentum=0.5, weight_decay=1e-3, multiplier=0.25),
}


def _sam_iteration_inputs(steps, seed=0):
    params = randn64(SHAPES, seed + 1)
    first = [randn64(SHAPES, seed + 10 + s, scale=1e-2) for s in range(steps)]
    second = [randn64(SHAPES, seed + 20 + s, scale=1e-2) for s in range(steps)]
    return params, first, second


def _native_ascent(weights, grads):
    """The native norm and perturbation (rho 0.05); returns the backups."""
    backups = [torch.empty_like(w) for w in weights]
    norm, _ = _sam_ops().grad_norm(grads, [], 0.0)
    call_perturb(weights, grads, backups, list(range(len(weights))), norm)
    assert not any(torch.equal(w, b) for w, b in zip(weights, backups, strict=True))
    return backups


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_fp64_sgd_step_is_torch_optim_sgd(native, case):
    options = dict(SGD_CASES[case])
    multiplier = options.pop("multiplier", None)
    options = {"dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False, **options}
    lr, steps = 0.1, 2
    params, first, second = _sam_iteration_inputs(steps)
    weights, buffers = clones(params), [torch.zeros_like(p) for p in params]
    expected = [p.clone() for p in params]
    optimizer = torch.optim.SGD(expected, lr=lr, foreach=False, **options)
    for s in range(steps):
        backups = _native_ascent(weights, first[s])
        factor = torch.tensor(multiplier) if multiplier is not None else None
        _sam_ops().restore_sgd_step_(weights, backups, second[s], buffers if options["momentum"] else [],
                                     [int(s == 0)] * len(params),
                                     SgdConfig(lr, **options).values(), factor, torch.tensor(0.0))
        for p, g in zip(expected, second[s], strict=True):
            p.grad = g * multiplier if multiplier is not None else g.clone()
        optimizer.step()
    assert_close(weights, expected, msg="weights")
    if options["momentum"]:
        assert_close(buffers, [optimizer.state[p]["momentum_buffer"] for p in expected], msg="buffers")


ADAM_CASES = {
    "adam": dict(),
    "adam_decay_amsgrad": dict(weight_decay=1e-2, amsgrad=True),
    "adamw_maximize": dict(decoupled=True, weight_decay=1e-2, maximize=True),
    "adamw_amsgrad_multiplier": dict(decoupled=True, weight_decay=1e-1, amsgrad=True, multiplier=0.5),
}


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_fp64_adam_step_is_torch_optim_adam(native, case):
    options = dict(ADAM_CASES[case])
    multiplier = options.pop("multiplier", None)
    decoupled = options.pop("decoupled", False)
    options = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, **options}
    lr, betas, eps, steps = 1e-2, (0.9, 0.999), 1e-8, 3
    params, first, second = _sam_iteration_inputs(steps, seed=100)
    weights = clones(params)
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    max_sqs = [torch.zeros_like(p) for p in params] if options["amsgrad"] else []
    counters = [torch.zeros(1) for _ in params]  # float32 step counters, advanced by the caller
    expected = [p.clone() for p in params]
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)(expected, lr=lr, betas=betas, eps=eps,
                                                                      foreach=False, **options)
    for s in range(steps):
        backups = _native_ascent(weights, first[s])
        for counter in counters:
            counter.add_(1)
        factor = torch.tensor(multiplier) if multiplier is not None else None
        _sam_ops().restore_adam_step_(weights, backups, second[s], exp_avgs, exp_avg_sqs, max_sqs, counters,
                                      AdamConfig(lr, *betas, eps, options["weight_decay"], decoupled,
                                                 options["amsgrad"], options["maximize"]).values(),
                                      factor, None)
        for p, g in zip(expected, second[s], strict=True):
            p.grad = g * multiplier if multiplier is not None else g.clone()
        optimizer.step()
    state = [optimizer.state[p] for p in expected]
    assert_close(weights, expected, msg="weights")
    assert_close(exp_avgs, [st["exp_avg"] for st in state], msg="exp_avg")
    assert_close(exp_avg_sqs, [st["exp_avg_sq"] for st in state], msg="exp_avg_sq")
    if options["amsgrad"]:
        assert_close(max_sqs, [st["max_exp_avg_sq"] for st in state], msg="max_exp_avg_sq")
    # fp32 math anywhere in the update would be off by ~1e-7 relative; the tolerance is 1e-12.
    assert all(w.dtype == torch.float64 for w in weights)


def test_fp64_and_other_dtypes_in_one_call(native):
    """One call over mixed dtypes computes each dtype as a call of its own would."""
    dtypes = [torch.float64, torch.float32, torch.bfloat16]
    params = [t.to(d) for t, d in zip(randn64(SHAPES, 1), dtypes, strict=True)]
    grads = [t.to(d) for t, d in zip(randn64(SHAPES, 2, 1e-2), dtypes, strict=True)]
    second = [t.to(d) for t, d in zip(randn64(SHAPES, 3, 1e-2), dtypes, strict=True)]
    norm = torch.tensor(0.3)

    def sam_step(ps, gs, g2s, indices):
        weights, backups, buffers = clones(ps), [torch.empty_like(p) for p in ps], clones(g2s)
        call_perturb(weights, gs, backups, indices, norm, keep_prob=0.5, seed=3, step=4)
        perturbed = clones(weights)
        _sam_ops().restore_sgd_step_(weights, backups, g2s, buffers, [0] * len(ps),
                                     [0.1, 0.9, 0.0, 1e-3, 1.0, 0.0], None, None)
        return perturbed, weights, buffers

    together = sam_step(params, grads, second, [0, 1, 2])
    for k in range(3):
        alone = sam_step([params[k]], [grads[k]], [second[k]], [k])
        for mixed, single in zip(together, alone, strict=True):
            assert_bitwise_equal(mixed[k], single[0])


# -- layouts

def _layout_cases():
    """(name, make): make(tensor of `shape`) returns a dense, non-contiguous tensor of the same shape."""
    return {
        "channels_last": ((2, 3, 5, 7), lambda t: t.contiguous(memory_format=torch.channels_last)),
        # 1 x 16 x 64 x 65: more than one chunk
        "channels_last_chunks": ((1, 16, 64, 65), lambda t: t.contiguous(memory_format=torch.channels_last)),
        "channels_last_3d": ((2, 3, 2, 3, 4), lambda t: t.contiguous(memory_format=torch.channels_last_3d)),
        "transposed": ((33, 17), lambda t: t.t().contiguous().t()),
    }


LAYOUTS = list(_layout_cases())


def _layout_tensors(layout, dtype, seeds, scale=1.0):
    shape, make = _layout_cases()[layout]
    tensors = [make(t.to(dtype)) for t in randn64([shape] * len(seeds), seeds[0], scale)]
    for t in tensors:
        assert not t.is_contiguous() and fills_its_memory(t)
    return tensors


def _flat(tensors):
    """The contiguous run's inputs: each tensor's memory order as a contiguous 1-D copy."""
    return [memory_order(t).clone() for t in tensors]


def _assert_same_memory(strided, flat, msg):
    assert_bitwise_equal([memory_order(t) for t in strided], flat, msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_layouts_run_as_their_memory_order(native, layout, dtype):
    """Every op on channels_last (etc.) tensors gives the contiguous run's results on the tensors' memory
    order, masks included (drawn over memory offsets)."""
    ops_ = _sam_ops()
    p = [t for t in _layout_tensors(layout, dtype, [1, 2])]
    g = _layout_tensors(layout, dtype, [3, 4], scale=1e-2)
    g2 = _layout_tensors(layout, dtype, [5, 6], scale=1e-2)
    assert p[0].stride() == g[0].stride() == g2[0].stride()
    flat_p, flat_g, flat_g2 = _flat(p), _flat(g), _flat(g2)
    indices, seed, step = [2, 7], 11, 3

    for weights in ([], p):
        norm, _ = ops_.grad_norm(g, weights, 0.01)
        flat_norm, _ = ops_.grad_norm(flat_g, _flat(weights), 0.01)
        assert_bitwise_equal(norm, flat_norm)

    runs = {}
    for name, (ps, gs, g2s) in {"strided": (p, g, g2), "flat": (flat_p, flat_g, flat_g2)}.items():
        w, b = clones(ps), [torch.empty_like(x) for x in ps]
        # rho 5: a perturbation that moves every kept element, bfloat16 ones too
        call_perturb(w, gs, b, indices, norm, rho=5.0, keep_prob=0.5, scale_factor=2.0, adaptive=True,
                     eta=0.01, seed=seed, step=step)
        perturbed = clones(w)
        restored = clones(w)
        ops_.restore_(restored, b)
        buffers = clones(g2s)
        ops_.restore_sgd_step_(w, b, g2s, buffers, [0, 1], [0.1, 0.9, 0.1, 1e-3, 1.0, 0.0],
                               torch.tensor(0.5), None)
        sgd_weights = clones(w)
        w = clones(perturbed)
        m, v, vmax = clones(gs), [x.abs() for x in g2s], [x.abs() * 2 for x in g2s]
        ops_.restore_adam_step_(w, b, g2s, m, v, vmax, [torch.full((1,), 3.0)] * 2,
                                [1e-3, 0.9, 0.999, 1e-8, 1e-2, 1.0, 1.0, 0.0], None, None)
        for t in [*w, *m, *v, *vmax, *perturbed, *b]:
            assert t.stride() == ps[0].stride()  # the kernels never change a layout
        runs[name] = dict(perturbed=perturbed, backups=b, restored=restored, sgd=sgd_weights, buffers=buffers,
                          adam=w, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vmax)
    for key, strided in runs["strided"].items():
        _assert_same_memory(strided, runs["flat"][key], key)
    _assert_same_memory(runs["strided"]["restored"], flat_p, "restored")

    # The mask in memory order: element at memory offset i is kept iff the contract keeps element i.
    for k, index in enumerate(indices):
        moved = memory_order(runs["strided"]["perturbed"][k]) != memory_order(p[k])
        keep = keep_bits(p[k].numel(), index, seed, step, mask_threshold(0.5))
        assert not (moved & ~keep).any()
        # Most kept elements move (in bfloat16 a small perturbation of a small weight can round away).
        assert moved.sum() > (0.6 if dtype == torch.bfloat16 else 0.99) * keep.sum()


def test_size_one_dimensions_may_have_any_stride(native):
    """A size-1 dimension's stride moves no element, so companions may disagree on it."""
    param = torch.randn(4, 1, 3).permute(2, 1, 0)  # shape (3, 1, 4), strides (1, 3, 3)
    grad = torch.empty_strided((3, 1, 4), (1, 1, 3)).copy_(torch.randn(3, 1, 4))
    assert not param.is_contiguous() and param.stride() != grad.stride()
    backup = torch.empty_strided((3, 1, 4), (1, 7, 3))
    weight = param.clone()
    call_perturb([weight], [grad], [backup], [0], torch.tensor(1.0))
    assert_bitwise_equal(backup, param)
    assert_close(weight, param + fp32_scale(torch.tensor(1.0), 0.05, 1e-12, 1.0) * grad)


def test_companion_with_another_layout_is_a_clear_error(native):
    ops_ = _sam_ops()
    param = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    contiguous = torch.randn(2, 3, 5, 7)
    other_cl = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    norm = torch.tensor(1.0)
    fix = r"torch\.empty_like\(params\[0\]\)"
    with pytest.raises(RuntimeError, match=r"grads\[0\]: shape \[2, 3, 5, 7\] with strides \[105, 35, 7, "
                                           r"1\] does not have the memory layout of params\[0\] .*strides "
                                           r"\[105, 1, 21, 3\].*" + fix):
        call_perturb([param], [contiguous], [torch.empty_like(param)], [0], norm)
    with pytest.raises(RuntimeError, match=r"backups\[0\]: .*memory layout of params\[0\].*" + fix):
        call_perturb([param], [other_cl], [torch.empty(2, 3, 5, 7)], [0], norm)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\]: .*memory layout of params\[0\]"):
        ops_.restore_sgd_step_([param], [other_cl], [other_cl], [contiguous], [0],
                               [0.1, 0.9, 0.0, 0.0, 0.0, 0.0], None, None)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\]: .*memory layout of params\[0\]"):
        ops_.restore_adam_step_([param], [other_cl], [other_cl], [other_cl.clone()], [contiguous], [],
                                [torch.ones(1)], [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0], None, None)
    with pytest.raises(RuntimeError, match=r"weights\[0\]: .*memory layout of grads\[0\].*empty_like\(grads"):
        ops_.grad_norm([param], [contiguous], 0.0)
    # A contiguous 1-D view of a contiguous parameter still pairs by element count (the rule before).
    ops_.restore_([contiguous], [torch.randn(210)])
    with pytest.raises(RuntimeError, match=r"params\[0\]: must be non-overlapping and dense .*strides "
                                           r"\[14, 2\].*contiguous\(\)"):
        ops_.restore_([torch.randn(4, 14)[:, ::2]], [torch.randn(4, 7)])
    with pytest.raises(RuntimeError, match=r"dtype Int is not supported \(float32, float64, float16, "):
        ops_.restore_([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)])


@pytest.mark.parametrize("keep_prob", [pytest.param(1.0, marks=pytest.mark.slow), 0.5],
                         ids=["unmasked", "masked"])
def test_a_large_perturbation_streams_the_backup_exactly(keep_prob):
    """Over 16 MiB per call the CPU perturbation streams the backup with non-temporal stores (NOTE
    (streamed backup), csrc/cpu/ops_cpu.cpp): weights and backups still equal the reference's bit for bit,
    for a view whose data starts off a 16-byte boundary and for bfloat16 next to float32."""
    require("native")
    generator = torch.Generator().manual_seed(0)
    storage = torch.randn(4_500_001, generator=generator)
    params = [storage[1:], torch.randn(300_001, generator=generator).to(torch.bfloat16)]
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
    results = {}
    for backend in ("native", "torch"):
        weights = [storage.clone()[1:], params[1].clone()]  # the same misaligned start for both
        backups = [torch.full_like(p, float("nan")) for p in weights]
        norm = ops.grad_norm(weights, grads, backend="torch")[0]
        ops.perturb_(weights, backups, norm, grads=grads, rho=0.5, keep_prob=keep_prob, seed=3, step=1,
                     backend=backend)
        results[backend] = (weights, backups)
    assert results["native"][0][0].data_ptr() % 16 != 0  # the misaligned start is exercised
    assert_bitwise_equal(results["native"][0], results["torch"][0], "weights")
    assert_bitwise_equal(results["native"][1], results["torch"][1], "backups")
