"""ESAM against the plain eager implementation of eager_reference.py: per-tensor SWP (the kept set drawn
here from the documented rule), the elementwise mask, and SDS with its documented selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import on_backends
from eager_reference import (
    ReferenceSAM,
    assert_models_close,
    assert_models_equal,
    batch_loss,
    clone_model,
    eager_esam_step,
    make_batches,
    make_model,
    sds_count,
)
from torch import nn

from sam_kernels.backends.common import mask_threshold
from sam_kernels.backends.reference import keep_mask
from sam_kernels.optim import ESAM, SAM, sample_losses_closure, selected_count

from .test_sam import BASES, assert_states_close, fit

STEPS = 3

#: The documented Philox stream of the per-tensor draw (tensor index 2**32 - 1).
SWP_STREAM = 2**32 - 1


def swp_kept(requires_grad: list[bool], seed: int, step: int, beta: float) -> list[int]:
    """Positions ESAM's documented draw keeps: tensor t (of those that require grad) is kept iff element
    t of the Philox mask stream SWP_STREAM at (seed, step) is kept at probability beta; if none would be,
    the one at position ``step % count`` of the eligible ones."""
    keep = keep_mask(len(requires_grad), SWP_STREAM, seed, step, mask_threshold(beta)).tolist()
    eligible = [t for t, flag in enumerate(requires_grad) if flag]
    kept = [t for t in eligible if keep[t]]
    return kept or [eligible[step % len(eligible)]]


def per_sample_cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


def eager_for(model, base_cls, base_options, rho) -> ReferenceSAM:
    group = {"params": list(model.parameters()), "rho": rho, "adaptive": False, "eta": 0.0}
    return ReferenceSAM([group], base_cls(model.parameters(), **base_options))


@pytest.mark.parametrize("base_name", BASES)
def test_tensor_swp_with_sds_matches_eager(backend, base_name):
    base_cls, base_options = BASES[base_name]
    beta, gamma, rho = 0.5, 0.5, 0.1
    model = make_model()
    reference_model = clone_model(model)
    esam = ESAM(model.parameters(), base_cls, rho=rho, beta=beta, gamma=gamma, seed=7, backend=backend,
                **base_options)
    reference = eager_for(reference_model, base_cls, base_options, rho)
    dropped = 0
    params, reference_params = list(model.parameters()), list(reference_model.parameters())
    for step, (x, y) in enumerate(make_batches(STEPS)):
        kept = {reference_params[t] for t in swp_kept([True] * len(params), 7, step, beta)}
        dropped += len(params) - len(kept)
        loss = esam.sds_step(sample_losses_closure(model, x, y, per_sample_cross_entropy))
        assert all(p.requires_grad for p in params)  # flags are the user's outside the ascent pass
        expected = eager_esam_step(reference, reference_model, x, y, beta=beta, gamma=gamma, kept=kept)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert dropped > 0
    assert_models_close(model, reference_model)
    assert_states_close(esam.base_optimizer, reference.base)


def test_elementwise_swp_matches_eager(backend):
    """swp='element': Bernoulli(beta) mask of the op layer's mask contract, scale 1/beta, full norm;
    gamma=1 runs through step(closure) in a generic loop."""
    base_cls, base_options = BASES["sgd"]
    beta, rho = 0.7, 0.1
    model = make_model()
    reference_model = clone_model(model)
    esam = ESAM(model.parameters(), base_cls, rho=rho, beta=beta, gamma=1.0, swp="element", seed=11,
                backend=backend, **base_options)
    reference = eager_for(reference_model, base_cls, base_options, rho)
    batches = make_batches(STEPS)
    fit(model, esam, batches)
    for step, (x, y) in enumerate(batches):
        masks = {p: keep_mask(p.numel(), index, 11, step, mask_threshold(beta)).view_as(p)
                 for index, p in enumerate(reference_model.parameters())}
        eager_esam_step(reference, reference_model, x, y, beta=beta, gamma=1.0, masks=masks)
    assert_models_close(model, reference_model)


@on_backends("swp", ["tensor", "element"], triton=["element"])  # the tensor drop is the host's
def test_beta_and_gamma_one_equal_sam(backend, swp):
    base_cls, base_options = BASES["adamw"]
    batches = make_batches(STEPS)
    sam_model, closure_model, sds_model = make_model(), make_model(), make_model()
    fit(sam_model, SAM(sam_model.parameters(), base_cls, backend=backend, **base_options), batches)
    options = {"beta": 1.0, "gamma": 1.0, "swp": swp, "backend": backend, **base_options}
    fit(closure_model, ESAM(closure_model.parameters(), base_cls, **options), batches)
    esam = ESAM(sds_model.parameters(), base_cls, **options)
    for x, y in batches:
        esam.sds_step(sample_losses_closure(sds_model, x, y, per_sample_cross_entropy))
    assert_models_equal(closure_model, sam_model)
    assert_models_equal(sds_model, sam_model)


@pytest.mark.parametrize(("gamma", "batch", "count"),
                         [(0.5, 10, 5), (0.5, 7, 4), (0.25, 6, 2), (0.1, 3, 1), (1.0, 5, 5), (0.3, 10, 3)])
def test_selection_keeps_exactly_round_gamma_batch(gamma, batch, count):
    assert selected_count(gamma, batch) == sds_count(gamma, batch) == count
    esam = ESAM(make_model().parameters(), torch.optim.SGD, lr=0.1, gamma=gamma, backend="torch")
    before = torch.randn(batch, generator=torch.Generator().manual_seed(batch))
    after = before + torch.randn(batch, generator=torch.Generator().manual_seed(batch + 1))
    indices = esam.select_samples(before, after)
    sharpness = after - before
    expected = torch.sort(torch.argsort(sharpness, descending=True)[:count]).values
    assert torch.equal(indices, expected)
    # The official rule (strictly sharper than the k-th sharpest) keeps one sample fewer.
    official = (sharpness > torch.topk(sharpness, count).values[-1]).sum().item()
    assert official == count - 1


def test_swp_drops_each_tensor_with_probability_one_minus_beta():
    """Inside ascent_pass the dropped tensors (and only they) stop requiring grad; outside it every flag,
    a user-frozen tensor's included, is the user's."""
    beta, steps = 0.6, 40
    params = [nn.Parameter(torch.ones(2)) for _ in range(30)]
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    esam = ESAM(params + [frozen], torch.optim.SGD, lr=0.1, beta=beta, gamma=1.0, backend="torch",
                seed=5)
    drawn = []
    for step in range(steps):
        assert all(p.requires_grad for p in params) and not frozen.requires_grad
        with esam.ascent_pass():
            drawn.append([not p.requires_grad for p in params])
            assert not frozen.requires_grad
            sum(((p - 2) ** 2).sum() for p in params if p.requires_grad).backward()
        kept = swp_kept([True] * 30 + [False], 5, step, beta)
        assert drawn[-1] == [t not in kept for t in range(30)]
        esam.first_step(zero_grad=True)
        assert all(p.requires_grad for p in params)  # the descent pass sees every tensor
        sum(((p - 2) ** 2).sum() for p in params).backward()
        esam.second_step(zero_grad=True)
    rate = torch.tensor(drawn, dtype=torch.float32).mean().item()
    assert abs(rate - (1 - beta)) < 0.05
    assert len({tuple(row) for row in drawn}) > steps // 2  # a fresh draw every step
    assert not frozen.requires_grad and frozen.grad is None


def test_swp_keeps_at_least_one_tensor():
    params = [nn.Parameter(torch.ones(3)) for _ in range(3)]
    esam = ESAM(params, torch.optim.SGD, lr=0.1, beta=0.01, gamma=1.0, backend="torch")
    for _ in range(5):
        with esam.ascent_pass():
            assert sum(p.requires_grad for p in params) == 1
            sum(((p - 2) ** 2).sum() for p in params if p.requires_grad).backward()
        esam.first_step(zero_grad=True)
        sum(((p - 2) ** 2).sum() for p in params).backward()
        esam.second_step(zero_grad=True)


def test_sds_no_grad_pass_and_descent_leave_batchnorm_alone():
    model = make_model()
    esam = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, gamma=0.5, backend="torch")
    x, y = make_batches(1)[0]
    single = clone_model(model)
    batch_loss(single, x, y)  # one train-mode forward: what the step may do to the statistics
    esam.sds_step(sample_losses_closure(model, x, y, per_sample_cross_entropy))
    for buffer, expected in zip(model[1].buffers(), single[1].buffers(), strict=True):
        assert torch.equal(buffer, expected)
