"""Hugging Face accelerate drives SAM through its AcceleratedOptimizer wrapper: the two-call style
(``sam_kernels.unwrap`` reaches first_step, the wrapper's step() runs the descent), torch's closure
convention and the popular SAM closure loop, in fp32 and bf16 on the CPU, with the real library;
two passes per step, the bare optimizer's weights bit for bit, eager SAM's to rounding (fp32)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from eager_reference import (
    ReferenceSAM,
    assert_models_close,
    batch_loss,
    eager_sam_step,
    make_batches,
    make_model,
)
from tolerance import assert_bitwise_equal

import sam_kernels
from sam_kernels.optim import SAM

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState  # noqa: E402

STEPS = 3
STYLES = ["two_call", "torch_closure", "popular_closure"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (its mixed precision among it); each test starts anew."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def sam_for(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=1e-3)


def train(style: str, optimizer, model, batches, backward, forward_context) -> list[int]:
    """``STEPS`` steps in ``style``; returns the forward passes of each step."""
    passes = []
    counter = [0]
    model.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))

    def loss_of(x, y):
        with forward_context():
            return batch_loss(model, x, y)

    for x, y in batches:
        before = counter[0]
        if style == "two_call":
            backward(loss_of(x, y))
            sam = sam_kernels.unwrap(optimizer)
            sam.first_step(zero_grad=True)
            with sam.second_pass():
                backward(loss_of(x, y))
            optimizer.step()
            optimizer.zero_grad()
        elif style == "torch_closure":
            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = loss_of(x, y)
                backward(loss)
                return loss
            optimizer.step(closure)
        else:  # the popular SAM README loop: the first backward is the loop's
            def closure(x=x, y=y):
                loss = loss_of(x, y)
                backward(loss)
                return loss
            backward(loss_of(x, y))
            optimizer.step(closure)
            optimizer.zero_grad()
        passes.append(counter[0] - before)
    return passes


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("style", STYLES)
def test_accelerate_matches_the_bare_optimizer(style, mixed_precision):
    batches = make_batches(STEPS)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = make_model()
    model, optimizer = accelerator.prepare(model, sam_for(model))
    assert not isinstance(optimizer, SAM)  # the wrapper, which has no first_step of its own
    passes = train(style, optimizer, model, batches, accelerator.backward, contextlib.nullcontext)
    assert passes == [2] * STEPS

    bare = make_model()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mixed_precision == "bf16" \
        else contextlib.nullcontext
    bare_passes = train(style, sam_for(bare), bare, batches, torch.Tensor.backward, autocast)
    assert bare_passes == passes
    assert_bitwise_equal([p.detach() for p in model.parameters()], [p.detach() for p in bare.parameters()])
    if mixed_precision == "no":
        eager = make_model()
        ref = ReferenceSAM.of_model(eager, torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9,
                                                       weight_decay=1e-3), rho=0.05)
        for x, y in batches:
            eager_sam_step(ref, eager, x, y)
        assert_models_close(model, eager)


def test_unwrap_names_the_fix_for_a_plain_optimizer():
    model = make_model()
    accelerator = accelerate.Accelerator(cpu=True)
    _, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"unwrap: AcceleratedOptimizer .*SAM\(model.parameters\(\)"):
        sam_kernels.unwrap(optimizer)


def test_fp16_two_call_through_accelerate_scaler_path_matches_the_bare_recipe():
    """accelerate's fp16 path (its GradScaler in accelerator.backward and in the wrapper's step) with
    first_step(grad_scaler=accelerator.scaler). accelerate enables fp16 only on a GPU, so the scaler is a
    CPU one set before prepare() and the forward runs under fp16 autocast: the wrapper's code path on the
    CPU. The bare recipe with its own scaler gives the same weights bit for bit."""
    batches = make_batches(STEPS)
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = make_model()
    model, optimizer = accelerator.prepare(model, sam_for(model))
    bare = make_model()
    bare_sam, scaler = sam_for(bare), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches:
        sam = sam_kernels.unwrap(optimizer)
        with fp16():
            accelerator.backward(batch_loss(model, x, y))
        sam.first_step(zero_grad=True, grad_scaler=accelerator.scaler)
        with sam.second_pass(), fp16():
            accelerator.backward(batch_loss(model, x, y))
        optimizer.step()
        optimizer.zero_grad()
        assert not optimizer.step_was_skipped

        with fp16():
            scaler.scale(batch_loss(bare, x, y)).backward()
        bare_sam.first_step(zero_grad=True, grad_scaler=scaler)
        with bare_sam.second_pass(), fp16():
            scaler.scale(batch_loss(bare, x, y)).backward()
        scaler.step(bare_sam)
        scaler.update()
        bare_sam.zero_grad()
    assert_bitwise_equal([p.detach() for p in model.parameters()], [p.detach() for p in bare.parameters()])
    assert accelerator.scaler.get_scale() == scaler.get_scale() == 2.0**10
