"""Gradient accumulation over micro-batches in both SAM passes (equal to one large batch) and gradient
clipping after the second pass (sam_kernels.clip against torch.nn.utils.clip_grad_norm_ and eager SAM)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import pairwise_over_backends
from eager_reference import ReferenceSAM, batch_loss, make_batches, make_mlp
from tolerance import assert_close

from sam_kernels.clip import clip_grad_norm_, grad_norm
from sam_kernels.optim import SAM

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


def pair(base: str, backend: str, rho: float = 0.05):
    model = make_mlp()
    ref_model = copy.deepcopy(model)
    base_cls, options = BASES[base]
    sam = SAM(model.parameters(), base_cls, rho=rho, backend=backend, **options)
    ref = ReferenceSAM.of_model(ref_model, base_cls(ref_model.parameters(), **options), rho=rho)
    return model, sam, ref_model, ref


@pairwise_over_backends(base=list(BASES), micro=[1, 2, 4])
def test_accumulation_equals_large_batch(backend, base, micro):
    """The documented recipe: each pass accumulates loss / n_micro over the micro-batches; equals eager SAM
    on the whole batch at once."""
    model, sam, ref_model, ref = pair(base, backend)
    for x, y in make_batches(3, size=16):
        xs, ys = x.chunk(micro), y.chunk(micro)
        for xm, ym in zip(xs, ys, strict=True):
            (batch_loss(model, xm, ym) / micro).backward()
        sam.first_step(zero_grad=True)
        for xm, ym in zip(xs, ys, strict=True):
            (batch_loss(model, xm, ym) / micro).backward()
        sam.second_step(zero_grad=True)
        ref.step([(x, y)])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)


def test_accumulation_with_grad_scaler(backend):
    """Micro-batches under GradScaler: scaler.scale(loss / n).backward() in each pass."""
    model, sam, ref_model, ref = pair("sgd", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in make_batches(2, size=16):
        xs, ys = x.chunk(4), y.chunk(4)
        for xm, ym in zip(xs, ys, strict=True):
            scaler.scale(batch_loss(model, xm, ym) / 4).backward()
        sam.first_step(zero_grad=True, grad_scaler=scaler)
        for xm, ym in zip(xs, ys, strict=True):
            scaler.scale(batch_loss(model, xm, ym) / 4).backward()
        scaler.step(sam)
        scaler.update()
        sam.zero_grad()
        ref.step([(x, y)])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)


@pairwise_over_backends(dtype=[torch.float32, torch.float16, torch.bfloat16], max_norm=[1e-3, 0.3, 1e3])
def test_clip_matches_torch(backend, dtype, max_norm):
    generator = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 5), (1,), (40, 3)]
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    expected = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for p, e in zip(params, expected, strict=True):
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        e.grad = p.grad.clone()
    exact = torch.linalg.vector_norm(torch.cat([e.grad.double().reshape(-1) for e in expected])).float()
    assert_close(grad_norm(params, backend=backend), exact, torch.float32)
    norm = clip_grad_norm_(params, max_norm, backend=backend)
    torch_norm = torch.nn.utils.clip_grad_norm_(expected, max_norm)
    assert_close(norm, exact, torch.float32)
    assert_close(norm, torch_norm.float(), dtype)
    assert_close([p.grad for p in params], [e.grad for e in expected])


@pairwise_over_backends(dtype=[torch.float32, torch.float64, torch.bfloat16],
                        norm_type=[2.0, float("inf"), 1.0, 3.0])
def test_clip_norm_types_and_float64_match_torch(backend, dtype, norm_type):
    generator = torch.Generator().manual_seed(1)
    shapes = [(7,), (3, 5), (40, 3)]
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    expected = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for p, e in zip(params, expected, strict=True):
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        e.grad = p.grad.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(expected, 0.5, norm_type=norm_type)
    norm = clip_grad_norm_(params, 0.5, norm_type, backend=backend)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(norm, torch_norm.to(norm.dtype), dtype, scale=4)
    assert_close([p.grad for p in params], [e.grad for e in expected], scale=4)


def test_clip_error_if_nonfinite_like_torch(backend):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True, backend=backend)
    assert torch.isnan(p.grad[1]) and p.grad[0] == 1.0  # untouched
    assert torch.isnan(clip_grad_norm_([p], 1.0, backend=backend))
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_([p], 1.0, norm_type=0.0)


def test_clip_skips_missing_grads_and_empty(backend):
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    b.grad = torch.tensor([3.0, 4.0])
    assert_close(clip_grad_norm_([a, b], 1.0, backend=backend), torch.tensor(5.0))
    assert_close(b.grad, torch.tensor([0.6, 0.8]))
    assert a.grad is None
    assert float(clip_grad_norm_([a], 1.0, backend=backend)) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([b], 0.0)


@pytest.mark.parametrize("base", list(BASES))
def test_clip_after_second_pass_matches_eager(backend, base):
    """Clipping between the second backward and second_step, against eager SAM clipping there."""
    model, sam, ref_model, ref = pair(base, backend)
    for x, y in make_batches(3, size=8):
        batch_loss(model, x, y).backward()
        sam.first_step(zero_grad=True)
        batch_loss(model, x, y).backward()
        clip_grad_norm_(model.parameters(), 0.05, backend=backend)
        sam.second_step(zero_grad=True)
        ref.step([(x, y)], clip=0.05)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)


def test_clip_under_grad_scaler(backend):
    """AMP: scaler.unscale_(optimizer), clip, scaler.step(optimizer)."""
    model, sam, ref_model, ref = pair("sgd", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9)
    for x, y in make_batches(3, size=8):
        scaler.scale(batch_loss(model, x, y)).backward()
        sam.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(batch_loss(model, x, y)).backward()
        scaler.unscale_(sam)
        clip_grad_norm_(model.parameters(), 0.05, backend=backend)
        scaler.step(sam)
        scaler.update()
        sam.zero_grad()
        ref.step([(x, y)], clip=0.05)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)
