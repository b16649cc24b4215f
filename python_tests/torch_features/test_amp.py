"""AMP: torch.amp.GradScaler driving SAM's two passes (fp16 autocast and plain fp32 with a loss scale),
bf16 autocast, non-finite gradients injected into each pass, and the scaler's state afterwards; compared
with the eager SAM of eager_reference.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import pairwise_over_backends
from eager_reference import HostSyncCounter, ReferenceSAM, batch_loss, make_batches, make_mlp, per_worker_step
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels.optim import SAM

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}
VARIANTS = {"sam": {"rho": 0.05}, "usam": {"rho": 0.02, "normalize_ascent": False},
            "ssam": {"rho": 0.05, "renormalize": True}}


def fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def amp_step(sam: SAM, scaler, model, x, y, *, autocast=None, corrupt_ascent=None, corrupt_descent=None):
    """The documented recipe: scaled backward, first_step(grad_scaler=...), scaled backward,
    scaler.step(optimizer), scaler.update()."""
    with autocast() if autocast else torch.autocast("cpu", enabled=False):
        loss = batch_loss(model, x, y)
    scaler.scale(loss).backward()
    if corrupt_ascent is not None:
        corrupt_ascent(list(model.parameters()))
    sam.first_step(zero_grad=True, grad_scaler=scaler)
    with autocast() if autocast else torch.autocast("cpu", enabled=False):
        loss2 = batch_loss(model, x, y)
    scaler.scale(loss2).backward()
    if corrupt_descent is not None:
        corrupt_descent(list(model.parameters()))
    scaler.step(sam)
    scaler.update()
    sam.zero_grad()
    return loss.detach()


def pair(base: str, variant: str, backend: str, *, fused=None):
    model = make_mlp()
    ref_model = copy.deepcopy(model)
    base_cls, base_options = BASES[base]
    options = VARIANTS[variant]
    sam = SAM(model.parameters(), base_cls, backend=backend, fused=fused, **options, **base_options)
    ref = ReferenceSAM.of_model(ref_model, base_cls(ref_model.parameters(), **base_options),
                                rho=options["rho"], normalize=options.get("normalize_ascent", True),
                                renormalize=options.get("renormalize", False))
    return model, sam, ref_model, ref


@pairwise_over_backends(base=list(BASES), variant=list(VARIANTS))
def test_scaled_fp32_matches_eager(backend, base, variant):
    """A loss scale of 2**12 on fp32: both passes unscaled on the device, same trajectory as unscaled
    eager SAM; the scaler's scale grows on schedule (no step was skipped)."""
    model, sam, ref_model, ref = pair(base, variant, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for x, y in make_batches(4, size=8):
        amp_step(sam, scaler, model, x, y)
        assert not ref.step([(x, y)])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10, msg=f"{base}/{variant}")
    assert scaler.get_scale() == 2.0**14


@pytest.mark.parametrize("base", list(BASES))
def test_fp16_autocast_matches_eager(backend, base):
    """fp16 autocast with GradScaler against eager SAM that scales, unscales and skips the same way."""
    model, sam, ref_model, ref = pair(base, "sam", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for x, y in make_batches(3, size=8):
        amp_step(sam, scaler, model, x, y, autocast=fp16_autocast)
        assert not ref.step([(x, y)], scale=2.0**10, autocast=fp16_autocast)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)
    assert scaler.get_scale() == 2.0**10


def test_fp16_overflow_backs_off(backend):
    """A scale so large that the fp16 backward overflows: the steps are skipped (weights bit for bit)
    and the scale halves each time until the gradients fit, then training proceeds."""
    model, sam, _, _ = pair("sgd", "sam", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    x, y = make_batches(1, size=8)[0]
    skipped = 0
    for _ in range(30):
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        amp_step(sam, scaler, model, x, y, autocast=fp16_autocast)
        if scaler.get_scale() < scale:
            skipped += 1
            assert_bitwise_equal([p.detach() for p in model.parameters()], before)
            assert scaler.get_scale() == scale * 0.5
        else:
            break
    assert skipped > 0
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))


def _corrupt(value: float):
    def corrupt(params):
        params[2].grad.view(-1)[1] = value
    return corrupt


@pairwise_over_backends(base=list(BASES), where=["ascent", "descent"],
                        value={"inf": math.inf, "nan": math.nan}, fused={"fused": None, "generic": False})
def test_nonfinite_in_either_pass_skips(backend, base, where, value, fused):
    """inf or nan injected into one pass at the second step: weights and base state are bit for bit the
    pre-step ones, the scaler backs off once and its growth tracker restarts; the next step is normal
    and matches eager SAM that skipped the same step."""
    model, sam, ref_model, ref = pair(base, "sam", backend, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    data = make_batches(3, size=8)
    corrupt = {f"corrupt_{where}": _corrupt(value)}
    amp_step(sam, scaler, model, *data[0])
    ref.step([data[0]], scale=2.0**8)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(sam.base_optimizer.state_dict()["state"])
    amp_step(sam, scaler, model, *data[1], **corrupt)
    assert ref.step([data[1]], scale=2.0**8, **corrupt)
    assert_bitwise_equal([p.detach() for p in model.parameters()], weights)
    after = sam.base_optimizer.state_dict()["state"]
    for index, entry in state.items():
        for key, tensor in entry.items():
            assert_bitwise_equal(after[index][key], tensor, f"state {index} {key}")
    assert scaler.get_scale() == 2.0**7
    assert int(scaler._growth_tracker) == 0
    amp_step(sam, scaler, model, *data[2])
    ref.step([data[2]], scale=2.0**7)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)
    assert scaler.get_scale() == 2.0**7


def test_unscale_before_step(backend):
    """scaler.unscale_(optimizer) before scaler.step (to clip or inspect): the grads are already unscaled
    and the optimizer must not unscale them again."""
    model, sam, ref_model, ref = pair("sgd", "sam", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    for x, y in make_batches(2, size=8):
        scaler.scale(batch_loss(model, x, y)).backward()
        sam.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(batch_loss(model, x, y)).backward()
        scaler.unscale_(sam)
        scaler.step(sam)
        scaler.update()
        sam.zero_grad()
        ref.step([(x, y)])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)


def test_disabled_scaler_is_plain_sam(backend):
    """GradScaler(enabled=False): the same loop is plain SAM (scaler.step calls step() without a
    closure, which is the descent)."""
    model, sam, ref_model, ref = pair("adamw", "sam", backend)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for x, y in make_batches(2, size=8):
        amp_step(sam, scaler, model, x, y)
        ref.step([(x, y)])
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)


def test_misuse_restores_and_raises(backend):
    model, sam, _, _ = pair("sgd", "sam", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    x, y = make_batches(1, size=8)[0]
    weights = [p.detach().clone() for p in model.parameters()]
    scaler.scale(batch_loss(model, x, y)).backward()
    sam.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(batch_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match=r"scaler\.step"):
        sam.second_step()
    assert_bitwise_equal([p.detach() for p in model.parameters()], weights)
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(sam, lambda: None)


def test_bf16_autocast_matches_eager(backend):
    """bf16 autocast needs no scaler: the plain two-call loop under autocast, against eager SAM under the
    same autocast."""
    model, sam, ref_model, ref = pair("sgd", "sam", backend)
    for x, y in make_batches(3, size=8):
        with bf16_autocast():
            loss = batch_loss(model, x, y)
        loss.backward()
        sam.first_step(zero_grad=True)
        with bf16_autocast():
            batch_loss(model, x, y).backward()
        sam.second_step(zero_grad=True)
        ref.step([(x, y)], autocast=bf16_autocast)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)


@pytest.mark.parametrize("base", BASES)
def test_fused_amp_path_makes_no_host_sync(base):
    """The fused path with the Triton kernels: first_step, scaler.step and scaler.update read nothing on
    the host, with and without an injected inf."""
    pytest.importorskip("triton")
    model, sam, _, _ = pair(base, "sam", "triton")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    data = make_batches(3, size=8)
    amp_step(sam, scaler, model, *data[0])  # state and metadata tables created
    for index, (x, y) in enumerate(data[1:]):
        scaler.scale(batch_loss(model, x, y)).backward()
        if index:
            _corrupt(math.inf)(list(model.parameters()))
        counter = HostSyncCounter()
        with counter:
            sam.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(batch_loss(model, x, y)).backward()
        with counter:
            scaler.step(sam)
            scaler.update()
        assert counter.syncs == [], counter.syncs
        sam.zero_grad()
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("corrupt", [False, True])
def test_esam_sds_step_with_grad_scaler(backend, corrupt):
    """ESAM.sds_step(grad_scaler=...): per-tensor SWP and SDS with both passes scaled, against the eager
    single-worker ESAM of eager_reference.py with the same dropped tensors; an inf in the first pass skips
    the step and backs the scale off."""
    from sam_kernels.optim import ESAM, sample_losses_closure

    model = make_mlp()
    ref_model = copy.deepcopy(model)
    esam = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, lr=0.1,
                backend=backend, seed=3)
    base = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    params = list(model.parameters())
    for step, (x, y) in enumerate(make_batches(3, size=16)):
        dropped = [i for i, p in enumerate(params) if any(p is d for d in esam.dropped_tensors)]
        poison = corrupt and step == 1
        weights = [p.detach().clone() for p in params]

        def losses(indices, poison=poison, x=x, y=y):
            out = sample_losses_closure(model, x, y, torch.nn.CrossEntropyLoss(reduction="none"))(indices)
            if poison and indices is None and torch.is_grad_enabled():
                out = out * torch.tensor([math.inf] + [1.0] * (out.numel() - 1))
            return out

        esam.sds_step(losses, grad_scaler=scaler)
        scaler.update()
        if poison:
            assert_bitwise_equal([p.detach() for p in params], weights)
            assert scaler.get_scale() == 2.0**9
            continue
        per_worker_step(ref_model, base, [(x, y)], rho=0.05, beta=0.5, gamma=0.5, dropped=dropped)
    for a, b in zip(params, ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)
