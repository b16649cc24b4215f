"""The Gaussian noise op (``ops.gaussian_noise_``) and its contract (``backends/common.py``, "noise
contract"): the distribution of the draws, their accuracy against a float64 Box-Muller of the same random
words, known answers that pin the contract, bit-identity of every kernel backend with the torch reference
for every dtype (the noise is computed with IEEE-exact float32 operations only), independence from how the
tensors are grouped, and the op layer's checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from targets import Target, require
from tensors import clones, make_tensors
from tolerance import assert_bitwise_equal

from sam_kernels import ops
from sam_kernels.backends import reference
from sam_kernels.backends.common import NOISE_CONSTANT_BITS, NOISE_CONSTANTS, NOISE_STREAM_TAG, split_u64

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DRAW = 1 << 20


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_draws_are_standard_normal():
    """Mean, variance, third and fourth moments and the Kolmogorov-Smirnov distance of a large draw. The
    draw is fixed (seed, step), so the bounds are checked once for all; they are 5-sigma wide for the
    moments and the KS test's 0.1% critical value."""
    z = reference.gaussian_noise(DRAW, 3, seed=12345, step=7).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    ordered = z.sort().values
    cdf = _normal_cdf(ordered)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ranks - cdf).abs(), (cdf - (ranks - 1 / n)).abs()).max().item()
    assert ks < 1.95 / math.sqrt(n)


def test_draws_match_a_float64_box_muller_of_the_same_words():
    """The float32 polynomials stay within 1e-6 of the exact transform ``sqrt(-2 ln u1) cos(2 pi u2)``."""
    element = torch.arange(DRAW, dtype=torch.int64)
    words = reference.philox4x32_10((element, 0, 5, NOISE_STREAM_TAG), split_u64(99))
    z = reference.box_muller(words[0], words[1]).double()
    u1 = ((words[0] >> 8) + 1).double() / 2**24
    u2 = (words[1] >> 8).double() / 2**24
    exact = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    assert (z - exact).abs().max().item() < 1e-6 * max(1.0, exact.abs().max().item())
    assert z.abs().max().item() <= math.sqrt(48 * math.log(2)) + 1e-6


def test_extreme_words():
    """u1 = 2**-24 gives the largest radius, u1 = 1 a zero draw; each quadrant's sign."""
    radius = math.sqrt(48 * math.log(2))
    low = torch.tensor([0, 0, 0, 0], dtype=torch.int64)
    quadrants = torch.tensor([0, 1 << 30, 2 << 30, 3 << 30], dtype=torch.int64)
    z = reference.box_muller(low, quadrants)
    assert z[0].item() == pytest.approx(radius, rel=1e-6)
    assert z[1].item() == pytest.approx(0.0, abs=1e-6) and z[3].item() == pytest.approx(0.0, abs=1e-6)
    assert z[2].item() == pytest.approx(-radius, rel=1e-6)
    eighth = torch.tensor([(1 << 29) << 0], dtype=torch.int64)  # 2 pi u2 = pi / 4
    assert reference.box_muller(low[:1], eighth).item() == pytest.approx(radius / math.sqrt(2), rel=1e-6)
    top = torch.tensor([0xFFFFFFFF], dtype=torch.int64)
    assert reference.box_muller(top, low[:1]).item() == 0.0


# The first four draws of tensor 0 at (seed 0, step 0) and of the last tensor at the largest seed and
# step, as float32 bit patterns: they pin the contract (any change of generator, stream, transform or
# constant shows here).
KNOWN_ANSWERS = [
    ((0, 0, 0), [-0x40F72C9F, -0x417D8864, -0x407C39FC, -0x408D9597]),
    ((2**64 - 1, 2**63 - 1, 2**32 - 1), [-0x41919B94, -0x40C942CC, -0x41BF784B, -0x4097D060]),
]


@pytest.mark.parametrize("key,bits", KNOWN_ANSWERS)
def test_known_answers(key, bits):
    seed, step, tensor_index = key
    z = reference.gaussian_noise(4, tensor_index, seed, step)
    assert z.view(torch.int32).tolist() == bits


def test_constants_are_their_float32_bit_patterns():
    for name, bits in NOISE_CONSTANT_BITS.items():
        assert torch.tensor(NOISE_CONSTANTS[name], dtype=torch.float32).view(torch.int32).item() == (
            bits - (1 << 32) if bits >= 1 << 31 else bits), name


def test_noise_stream_is_not_the_mask_stream():
    """Counter word 3's tag: the noise's words are not the mask's of the same seed, step and tensor."""
    element = torch.arange(4096, dtype=torch.int64)
    mask_words = reference.philox4x32_10((element, 2, 9, 0), (7, 0))
    noise_words = reference.philox4x32_10((element, 2, 9, NOISE_STREAM_TAG), (7, 0))
    assert not torch.equal(mask_words[0], noise_words[0])
    assert not torch.equal(mask_words[1], noise_words[1])


def _noise_case(dtype, shapes, precision, seed=2**40 + 5, step=2**33 + 7, device="cpu"):
    params = make_tensors(shapes, dtype, 1, device=device)
    scales = [t.abs() + 0.5 for t in make_tensors(shapes, dtype, 2, device=device)]
    options = {"factor": 3.0 if precision else 0.25, "precision": precision, "seed": seed, "step": step,
               "tensor_indices": [4 + 3 * i for i in range(len(shapes))]}
    return params, scales, options


def _run(backend, params, scales, options, device="cpu"):
    params = [p.to(device) for p in params]
    scales = [s.to(device) for s in scales]
    backups = [torch.empty_like(p) for p in params]
    ops.gaussian_noise_(params, backups, scales, backend=backend, **options)
    return [p.cpu() for p in params], [b.cpu() for b in backups]


@pytest.mark.parametrize("precision", [True, False], ids=["precision", "std"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_backend_adds_the_references_noise_bit_for_bit(kernel: Target, dtype, precision):
    """Bit for bit on every kernel (GPU ones included: no FMA, IEEE division and sqrt), every dtype, a
    tensor of more than one chunk, an empty one and a scalar; the backups are the weights' exact bits."""
    shapes = [(kernel.chunk + 3,), (0,), (), (3, 5)]
    params, scales, options = _noise_case(dtype, shapes, precision)
    expected, expected_backups = _run("torch", clones(params), scales, options)
    actual, backups = _run(kernel.backend, clones(params), scales, options, kernel.device)
    assert_bitwise_equal(actual, expected)
    assert_bitwise_equal(backups, params)
    assert_bitwise_equal(expected_backups, params)


def test_noise_is_sigma_times_the_contracts_normal():
    """w = 0 and sigma = 1 leave exactly the contract's normals; sigma scales them."""
    shapes = [(1000,), (7,)]
    params = [torch.zeros(s) for s in shapes]
    ops.gaussian_noise_(params, clones(params), [torch.ones(s) for s in shapes], seed=3, step=11,
                        tensor_indices=[2, 8], backend="torch")
    for param, index in zip(params, [2, 8], strict=True):
        assert_bitwise_equal(param, reference.gaussian_noise(param.numel(), index, 3, 11))
    precise = [torch.zeros(50)]
    ops.gaussian_noise_(precise, clones(precise), [torch.full((50,), 4.0)], factor=100.0, precision=True,
                        seed=3, step=11, backend="torch")
    torch.testing.assert_close(precise[0], reference.gaussian_noise(50, 0, 3, 11) / 20.0)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_noise_depends_on_the_global_index_only(backend):
    """One tensor gets the same noise alone or among tensors of other dtypes (grouping by dtype and
    chunking change nothing); another step, seed or index gives other noise; restore_ undoes it."""
    require(backend)
    shapes = [(300,), (20,), (5, 4)]
    mixed = make_tensors(shapes, torch.float32, 1)
    mixed[1] = mixed[1].to(torch.bfloat16)
    scales = [torch.ones_like(p) for p in mixed]
    together = clones(mixed)
    backups = [torch.empty_like(p) for p in mixed]
    ops.gaussian_noise_(together, backups, scales, seed=1, step=2, tensor_indices=[7, 8, 9], backend=backend)
    alone = [mixed[2].clone()]
    ops.gaussian_noise_(alone, [torch.empty_like(alone[0])], [scales[2]], seed=1, step=2, tensor_indices=[9],
                        backend=backend)
    assert_bitwise_equal(alone[0], together[2])
    changes = [{"seed": 2, "step": 2, "tensor_indices": [9]}, {"seed": 1, "step": 3, "tensor_indices": [9]},
               {"seed": 1, "step": 2, "tensor_indices": [10]}]
    for change in changes:
        other = [mixed[2].clone()]
        ops.gaussian_noise_(other, [torch.empty_like(other[0])], [scales[2]], backend=backend, **change)
        assert not torch.equal(other[0], together[2]), change
    ops.restore_(together, backups, backend=backend)
    assert_bitwise_equal(together, mixed)


def test_device_step_tensor_gives_the_int_steps_noise():
    params = [torch.zeros(64)]
    ops.gaussian_noise_(params, clones(params), [torch.ones(64)], seed=5,
                        step=torch.tensor(2**35 + 1, dtype=torch.int64), backend="torch")
    assert_bitwise_equal(params[0], reference.gaussian_noise(64, 0, 5, 2**35 + 1))


@pytest.mark.parametrize("kwargs,message", [
    ({"factor": float("nan")}, "factor: must be a finite number"),
    ({"factor": 0.0, "precision": True}, "factor: must be positive with precision=True"),
    ({"precision": 1}, "precision: must be True or False"),
    ({"seed": -1}, "seed: must be an int"),
    ({"seed": 2**64}, "seed: must be an int"),
    ({"tensor_indices": [0, 2**32]}, "tensor_indices: every index"),
    ({"tensor_indices": [0]}, "tensor_indices: expected 2"),
    ({"step": -1}, "step: must be in"),
])
def test_bad_arguments_are_refused_with_their_name(kwargs, message):
    params = make_tensors([(3,), (4,)])
    with pytest.raises((ValueError, TypeError), match=message):
        ops.gaussian_noise_(params, clones(params), [torch.ones_like(p) for p in params], **kwargs)


def test_companions_must_match_their_parameter():
    params = make_tensors([(3,), (4,)])
    with pytest.raises(ValueError, match=r"scales\[1\]: shape"):
        ops.gaussian_noise_(params, clones(params), [torch.ones(3), torch.ones(5)])
    with pytest.raises(ValueError, match=r"scales\[0\]: dtype"):
        ops.gaussian_noise_(params, clones(params), [torch.ones(3, dtype=torch.float64), torch.ones(4)])
    with pytest.raises(ValueError, match="scales: expected 2 tensors"):
        ops.gaussian_noise_(params, clones(params), [torch.ones(3)])


def test_native_opcheck():
    require("native")
    p = make_tensors([(7,), (3, 5), (70000,)], torch.float32, 1)
    mixed = [p[0].to(torch.bfloat16), p[1], p[2].to(torch.float16)]
    step = torch.tensor(3, dtype=torch.int64)
    op = torch.ops.sam_kernels.gaussian_noise_.default
    torch.library.opcheck(op, (p, clones(p), [t.abs() + 1 for t in p], [0, 5, 9], step, [2.0, 1.0], 1, 2))
    torch.library.opcheck(op, (mixed, clones(mixed), [t.abs() + 1 for t in mixed], [0, 1, 2], step,
                               [0.5, 0.0], 0, 0))


def test_triton_opcheck():
    from sam_kernels.backends import triton_backend
    p = make_tensors([(7,), (3, 5), (triton_backend.CHUNK + 3,)], torch.float32, 1)
    step = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(torch.ops.sam_kernels_triton.gaussian_noise_.default,
                          (p, clones(p), [t.abs() + 1 for t in p], [0, 5, 9], step, [2.0, 1.0], 1, 2, 0))
