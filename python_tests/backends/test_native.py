"""What is particular to the native backend (sam_kernels._C, csrc/): build facts, the registry, the C++
Philox, thread-count determinism, ResNet-50's full size, opcheck and tracing, CUDA streams. Every op
against the reference runs for every backend in python_tests/test_ops.py.

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

MULTI_CHUNK = CHUNK + 3
# Tensor counts 1, 3 and 300; sizes 0, 1, 7, 1000 and more than one chunk.
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
