"""Micro-batch SAM (m-sharpness): ``accumulate()`` and ``micro_batch_step`` against the eager reference of
variant_reference.py (each micro-batch its own ascent, the descent on the sum of their SAM gradients):
every calling style, SGD and AdamW, ASAM and a schedule's plain steps, GradScaler, two passes per
micro-batch, the running sum kept in the gradients' own tensors, non-finite gradients in any pass of any
micro-batch, the refused variants, and bad calls."""

from __future__ import annotations

import math

import pytest
import torch
from cases import pairwise_over_backends
from eager_reference import assert_models_close, batch_loss, clone_model, make_batches, make_model
from tolerance import assert_bitwise_equal
from variant_reference import EagerMicroBatchSAM

from sam_kernels.optim import AESAM, ESAM, GSAM, SAM, Interval, LookSAM, MultiStepSAM

K = 4
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}


def micro_batches(x, y):
    return list(zip(x.chunk(K), y.chunk(K), strict=True))


def micro_loss(model, batch):
    return batch_loss(model, *batch) / K


def two_call(optimizer, model, batches, corrupt=None, scaler=None) -> None:
    """The documented loop; ``corrupt`` = (micro-batch, pass, value) written into the first gradient."""
    optimizer.zero_grad()
    for index, batch in enumerate(batches):
        loss = micro_loss(model, batch)
        (scaler.scale(loss) if scaler else loss).backward()
        if corrupt is not None and corrupt[:2] == (index, 0):
            next(model.parameters()).grad.view(-1)[0] = corrupt[2]
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        if optimizer.needs_second_pass():
            with optimizer.second_pass():
                loss = micro_loss(model, batch)
                (scaler.scale(loss) if scaler else loss).backward()
        if corrupt is not None and corrupt[:2] == (index, 1):
            next(model.parameters()).grad.view(-1)[0] += corrupt[2]
        if index < len(batches) - 1:
            optimizer.accumulate()
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.second_step()


def backward_closure(model, batch):
    loss = micro_loss(model, batch)
    loss.backward()
    return loss


def accumulate_closures(optimizer, model, batches) -> None:
    optimizer.zero_grad()
    for index, batch in enumerate(batches):
        def closure(batch=batch):
            return backward_closure(model, batch)
        if index < len(batches) - 1:
            optimizer.accumulate(closure)
        else:
            optimizer.step(closure)


def micro_batch_step(optimizer, model, batches) -> None:
    losses = []

    def closure(batch):
        losses.append(backward_closure(model, batch))
        return losses[-1]

    total = optimizer.micro_batch_step(closure, batches)
    passes = optimizer.policy.ascent_steps + 1
    assert total == sum(loss.detach() for loss in losses[::passes])  # the losses at w, summed


STYLES = {"two_call": two_call, "accumulate_closure": accumulate_closures,
          "micro_batch_step": micro_batch_step}


def build(model, base_name: str, backend: str, **options):
    base, kwargs = BASES[base_name]
    return SAM(model.parameters(), base, rho=0.1, backend=backend, **kwargs, **options)


def reference_of(model, base_name: str) -> EagerMicroBatchSAM:
    base, kwargs = BASES[base_name]
    return EagerMicroBatchSAM(model, base(model.parameters(), **kwargs), rho=0.1)


@pairwise_over_backends(style=list(STYLES), base_name=list(BASES))
def test_micro_batches_match_reference(backend, style, base_name):
    """Three steps of K micro-batches, the loss scaled by 1/K: the mean of K independent SAM gradients."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, base_name, backend)
    reference = reference_of(expected, base_name)
    for x, y in make_batches(3, size=16):
        STYLES[style](optimizer, model, micro_batches(x, y))
        reference.step(expected, micro_batches(x, y), scale=1.0 / K)
    assert_models_close(model, expected)


def test_micro_batches_differ_from_one_batch():
    """Each micro-batch's own ascent is another algorithm than one ascent on the whole batch (so the test
    above can fail)."""
    model, twin = make_model(), make_model()
    a, b = build(model, "sgd", "torch"), build(twin, "sgd", "torch")
    x, y = make_batches(1, size=16)[0]
    two_call(a, model, micro_batches(x, y))
    two_call(b, twin, [(x, y)])
    assert any((p - q).abs().max() > 1e-5 for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def test_asam_and_plain_steps_of_a_schedule(backend):
    """ASAM's weighting per micro-batch, and a host schedule: its plain steps descend on the sum of the
    micro-batches' first gradients, its SAM steps as above."""
    model = make_model()
    optimizer = build(model, "sgd", backend, schedule=Interval(2))
    expected = clone_model(model)
    reference = reference_of(expected, "sgd")
    for step, (x, y) in enumerate(make_batches(3, size=16)):
        two_call(optimizer, model, micro_batches(x, y))
        reference.step(expected, micro_batches(x, y), scale=1.0 / K, plain=step % 2 == 1)
    assert_models_close(model, expected)


def test_grad_scaler_matches_unscaled(backend):
    """Each micro-batch's ascent unscaled on the device, the descent through scaler.step: the unscaled
    run's weights to rounding (the scale is a power of two)."""
    model, twin = make_model(), make_model()
    scaled, plain = build(model, "adamw", backend), build(twin, "adamw", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for x, y in make_batches(2, size=16):
        two_call(scaled, model, micro_batches(x, y), scaler=scaler)
        two_call(plain, twin, micro_batches(x, y))
    assert_models_close(model, twin)


def test_two_passes_per_micro_batch_and_the_sum_in_the_gradients_own_tensors():
    """micro_batch_step runs 2 forward passes per micro-batch; the sum lives in the first micro-batch's
    second-pass gradient tensors (no buffer of its own) until the descent."""
    model = make_model()
    optimizer = build(model, "sgd", "torch")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    x, y = make_batches(1, size=16)[0]
    micro_batch_step(optimizer, model, micro_batches(x, y))
    assert len(forwards) == 2 * K
    optimizer.zero_grad()
    batches = micro_batches(x, y)
    storage = None
    for index, batch in enumerate(batches):
        micro_loss(model, batch).backward()
        optimizer.first_step(zero_grad=True)
        with optimizer.second_pass():
            micro_loss(model, batch).backward()
        pointers = [p.grad.data_ptr() for p in model.parameters()]
        storage = storage or pointers
        assert pointers == storage, f"micro-batch {index}: the sum moved to new tensors"
        if index < K - 1:
            optimizer.accumulate()
    optimizer.second_step()


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("corrupt", [(0, 0, math.nan), (2, 1, math.inf), (3, 0, -math.inf)],
                         ids=["first-ascent", "third-descent", "last-ascent"])
def test_non_finite_gradient_skips_the_step(backend, corrupt):
    """A non-finite gradient in any pass of any micro-batch skips the whole step: the weights bit for
    bit and the optimizer state unchanged; the next step equals the reference's."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, "sgd", backend)
    reference = reference_of(expected, "sgd")
    batches = make_batches(3, size=16)
    two_call(optimizer, model, micro_batches(*batches[0]))
    reference.step(expected, micro_batches(*batches[0]), scale=1.0 / K)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    two_call(optimizer, model, micro_batches(*batches[1]), corrupt=corrupt)
    assert reference.step(expected, micro_batches(*batches[1]), scale=1.0 / K,
                          corrupt=(corrupt[0], corrupt[1], corrupt[2]))
    assert_bitwise_equal(list(model.parameters()), before, "a skipped step restores w")
    assert_bitwise_equal([optimizer.state[p]["momentum_buffer"] for p in model.parameters()], buffers,
                         "a skipped step leaves the momentum")
    two_call(optimizer, model, micro_batches(*batches[2]))
    reference.step(expected, micro_batches(*batches[2]), scale=1.0 / K)
    assert_models_close(model, expected)


@pytest.mark.parametrize("make, match", [
    (lambda m: GSAM(m.parameters(), torch.optim.SGD, lr=0.1), "GSAM"),
    (lambda m: LookSAM(m.parameters(), torch.optim.SGD, lr=0.1), "LookSAM"),
    (lambda m: ESAM(m.parameters(), torch.optim.SGD, lr=0.1, beta=0.5, gamma=1.0), "ESAM"),
    (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, renormalize=True), "renormalizes"),
    (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, schedule=AESAM(total_steps=10)), "AESAM"),
], ids=["gsam", "looksam", "esam", "ssam", "aesam"])
def test_refused_variants_name_the_reason_and_restore_w(make, match):
    model = make_model()
    optimizer = make(model)
    x, y = make_batches(1, size=16)[0]
    before = [p.detach().clone() for p in model.parameters()]
    batch = micro_batches(x, y)[0]
    micro_loss(model, batch).backward()
    optimizer.first_step(zero_grad=True)
    if optimizer.needs_second_pass():
        with optimizer.second_pass():
            micro_loss(model, batch).backward()
    with pytest.raises(ValueError, match=match):
        optimizer.accumulate()
    assert_bitwise_equal(list(model.parameters()), before, "a refused accumulate() restores w")


def test_bad_calls():
    model = make_model()
    optimizer = build(model, "sgd", "torch")
    with pytest.raises(RuntimeError, match="after first_step"):
        optimizer.accumulate()
    with pytest.raises(ValueError, match="micro_batches"):
        optimizer.micro_batch_step(lambda batch: None, [])


def test_zero_grad_drops_the_sum():
    """zero_grad() between micro-batches starts the accumulation over: the step equals one on the last
    micro-batch alone."""
    model, twin = make_model(), make_model()
    optimizer, single = build(model, "sgd", "torch"), build(twin, "sgd", "torch")
    x, y = make_batches(1, size=16)[0]
    batches = micro_batches(x, y)
    two_call(optimizer, model, batches[:2])  # a step over two micro-batches on both
    two_call(single, twin, batches[:2])
    micro_loss(model, batches[0]).backward()
    optimizer.first_step(zero_grad=True)
    with optimizer.second_pass():
        micro_loss(model, batches[0]).backward()
    optimizer.accumulate()
    optimizer.zero_grad()
    two_call(optimizer, model, batches[1:2])
    two_call(single, twin, batches[1:2])
    assert_bitwise_equal(list(model.parameters()), list(twin.parameters()), "the dropped sum")


def test_multi_step_ascents_per_micro_batch(backend):
    """MultiStepSAM's further ascent steps in each micro-batch: the sum is set aside until the last of
    them, so the descent is the sum of the micro-batches' multi-step SAM gradients."""
    model = make_model()
    expected = clone_model(model)
    base, kwargs = BASES["sgd"]
    optimizer = MultiStepSAM(model.parameters(), base, rho=0.1, ascent_steps=2, backend=backend, **kwargs)
    reference = EagerMicroBatchSAM(expected, base(expected.parameters(), **kwargs), rho=0.1, ascent_steps=2)
    for x, y in make_batches(2, size=16):
        micro_batch_step(optimizer, model, micro_batches(x, y))
        reference.step(expected, micro_batches(x, y), scale=1.0 / K)
    assert_models_close(model, expected)


def test_zeroing_the_held_sum_is_refused_and_nothing_is_lost():
    """zero_grad() between a later micro-batch's first_step and its descent would drop the sum: refused
    with the fix named, and the step then completes as the reference's; a closure that zeroes the
    gradients is refused the same way."""
    model = make_model()
    expected = clone_model(model)
    optimizer = build(model, "sgd", "torch")
    reference = reference_of(expected, "sgd")
    x, y = make_batches(1, size=16)[0]
    batches = micro_batches(x, y)[:2]
    optimizer.zero_grad()
    for index, batch in enumerate(batches):
        micro_loss(model, batch).backward()
        optimizer.first_step(zero_grad=True)
        if index == 1:
            with pytest.raises(RuntimeError, match=r"first_step\(zero_grad=True\)"):
                optimizer.zero_grad()
        with optimizer.second_pass():
            micro_loss(model, batch).backward()
        optimizer.accumulate() if index == 0 else optimizer.second_step()
    reference.step(expected, batches, scale=1.0 / K)
    assert_models_close(model, expected)

    def zeroing(batch):
        optimizer.zero_grad()
        return backward_closure(model, batch)

    optimizer.accumulate(lambda: zeroing(batches[0]))
    with pytest.raises(RuntimeError, match="must not zero"):
        optimizer.accumulate(lambda: zeroing(batches[1]))


def test_a_parameter_absent_from_a_later_micro_batch_keeps_its_sum():
    """On a schedule's plain step and on a SAM step alike, a parameter used only by the first micro-batch
    descends on that micro-batch's gradient."""
    torch.manual_seed(0)
    shared, first_only = (torch.nn.Parameter(torch.randn(3)) for _ in range(2))
    optimizer = SAM([shared, first_only], torch.optim.SGD, lr=1.0, rho=0.1, schedule=Interval(2),
                    backend="torch")
    for step in range(2):
        before = first_only.detach().clone()
        optimizer.zero_grad()
        for index in range(2):
            def loss(index=index):
                return (shared * shared).sum() + ((first_only * first_only).sum() if index == 0 else 0)
            loss().backward()
            optimizer.first_step(zero_grad=True)
            if optimizer.needs_second_pass():
                with optimizer.second_pass():
                    loss().backward()
            optimizer.accumulate() if index == 0 else optimizer.second_step()
        moved = (before - first_only.detach()).abs().max().item()
        assert moved > 0.5 * 2 * before.abs().max().item(), f"step {step}: the first micro-batch's gradient"


def test_step_hooks_run_once_per_step():
    model = make_model()
    optimizer = build(model, "sgd", "torch")
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    x, y = make_batches(1, size=16)[0]
    two_call(optimizer, model, micro_batches(x, y))
    assert calls == ["pre", "post"]


def test_momentum_sam_refuses_micro_batches_and_stays_perturbed():
    """MomentumSAM has no ascent per micro-batch: accumulate() and micro_batch_step are refused before
    anything moves, so the weights stay at its pending perturbation w~."""
    from sam_kernels.optim import MomentumSAM

    model = make_model()
    optimizer = MomentumSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.3, backend="torch")
    x, y = make_batches(1, size=16)[0]
    for _ in range(2):
        optimizer.zero_grad()
        batch_loss(model, x, y).backward()
        optimizer.step()
    perturbed = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="one pass per step"):
        optimizer.accumulate()
    with pytest.raises(RuntimeError, match="one pass per step"):
        optimizer.micro_batch_step(lambda batch: backward_closure(model, batch), micro_batches(x, y))
    assert_bitwise_equal(list(model.parameters()), perturbed, "the weights stay at w~")
