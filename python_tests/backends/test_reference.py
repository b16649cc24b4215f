"""The reference backend against independent ground truth: Philox known answers, a plain per-tensor eager
SAM written from the papers, and torch.optim's own SGD and AdamW for the base step."""

import pytest
import torch
from known_answers import PHILOX_KAT
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels import ops
from sam_kernels.backends import reference
from sam_kernels.backends.common import mask_threshold


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32_10([torch.tensor(c) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def test_mask_threshold_bounds():
    assert mask_threshold(1.0) == 1 << 24
    assert mask_threshold(0.5) == 1 << 23
    mask = reference.keep_mask(10, 0, seed=1, step=0, keep_threshold=mask_threshold(1.0))
    assert bool(mask.all())


SHAPES = [(4, 3), (7,), (1,), (2, 2, 5)]


def eager_sam_perturbation(params, grads, rho, eps=1e-12, adaptive=False, eta=0.0):
    """The ascent e of SAM (Foret et al.) / ASAM (Kwon et al.), written from the papers, per tensor."""
    weights = [(p.abs() + eta) if adaptive else torch.ones_like(p) for p in params]
    norm = torch.stack([(w * g).norm(2) for w, g in zip(weights, grads)]).norm(2)
    return [rho * w * w * g / (norm + eps) for w, g in zip(weights, grads)], norm


def model_and_grads(seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    first = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    second = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    return params, first, second


@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_reference_ascent_matches_eager_sam(adaptive, eta):
    params, grads, _ = model_and_grads(0)
    expected, expected_norm = eager_sam_perturbation(params, grads, rho=0.05, adaptive=adaptive, eta=eta)
    norm, flag = ops.grad_norm(params, grads, adaptive=adaptive, adaptive_eta=eta, backend="torch")
    assert flag.item() == 0.0
    assert_close(norm, expected_norm)
    perturbed = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(perturbed, backups, norm, grads=grads, rho=0.05, adaptive=adaptive, adaptive_eta=eta,
                 backend="torch")
    assert_close(perturbed, [p + e for p, e in zip(params, expected)])
    assert_bitwise_equal(backups, params)


def test_reference_masked_ascent_is_scaled_by_inverse_keep_prob():
    params, grads, _ = model_and_grads(1)
    expected, norm = eager_sam_perturbation(params, grads, rho=0.1)
    perturbed = [p.clone() for p in params]
    ops.perturb_(perturbed, [torch.empty_like(p) for p in params], norm, grads=grads, rho=0.1,
                 keep_prob=0.5, seed=3, step=4, backend="torch")
    for i, (p, e, w) in enumerate(zip(params, expected, perturbed)):
        mask = reference.keep_mask(p.numel(), i, 3, 4, mask_threshold(0.5)).view_as(p)
        assert_close(w, p + torch.where(mask, e / 0.5, torch.zeros_like(e)))


def test_reference_scale_factor_is_apart_from_the_mask():
    """ESAM's per-tensor drop: no elementwise mask (keep_prob 1), the kept perturbation times 1 / beta."""
    params, grads, _ = model_and_grads(1)
    expected, norm = eager_sam_perturbation(params, grads, rho=0.1)
    perturbed = [p.clone() for p in params]
    ops.perturb_(perturbed, [torch.empty_like(p) for p in params], norm, grads=grads, rho=0.1,
                 keep_prob=1.0, scale_factor=1 / 0.6, backend="torch")
    assert_close(perturbed, [p + e / 0.6 for p, e in zip(params, expected, strict=True)])


def eager_sam_run(optimizer_cls, options, steps, rho=0.05, dtype=torch.float32):
    """Plain per-tensor SAM with torch.optim for the base step, on fixed synthetic gradients."""
    params, first, second = model_and_grads(2, dtype)
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    base = optimizer_cls(leaves, **options)
    for step in range(steps):
        e, _ = eager_sam_perturbation([p.detach() for p in leaves], first, rho)
        backups = [p.detach().clone() for p in leaves]
        with torch.no_grad():
            for p, ei in zip(leaves, e):
                p.add_(ei)
        with torch.no_grad():
            for p, b in zip(leaves, backups):
                p.copy_(b)
        for p, g in zip(leaves, second):
            p.grad = g * (1 + 0.1 * step)
        base.step()
    return [p.detach() for p in leaves]


def reference_sam_run(kind, options, steps, rho=0.05, dtype=torch.float32):
    params, first, second = model_and_grads(2, dtype)
    backups = [torch.empty_like(p) for p in params]
    buffers = [None] * len(params)
    adam_state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    adam_steps = [torch.tensor(0.0) for _ in params]
    for step in range(steps):
        norm, _ = ops.grad_norm(params, first, backend="torch")
        ops.perturb_(params, backups, norm, grads=first, rho=rho, backend="torch")
        grads = [g * (1 + 0.1 * step) for g in second]
        if kind == "sgd":
            buffers = ops.restore_sgd_step_(params, backups, buffers, grads=grads, backend="torch", **options)
        else:
            ops.restore_adam_step_(params, backups, *adam_state, adam_steps, grads=grads, backend="torch",
                                   **options)
    return params


SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "maximize": True, "weight_decay": 0.1},
]


# float64: torch.optim computes in fp64, and so must the reference (to fp64's tolerance).
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SGD_CASES)
def test_reference_sam_with_sgd_matches_torch_optim(options, dtype):
    expected = eager_sam_run(torch.optim.SGD, options, steps=4, dtype=dtype)
    assert_close(reference_sam_run("sgd", options, steps=4, dtype=dtype), expected)


ADAM_CASES = [
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True,
                         "betas": (0.8, 0.95), "eps": 1e-6}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("optimizer_cls", "options"), ADAM_CASES)
def test_reference_sam_with_adam_matches_torch_optim(optimizer_cls, options, dtype):
    expected = eager_sam_run(optimizer_cls, options, steps=4, dtype=dtype)
    ours = dict(options, decoupled_weight_decay=optimizer_cls is torch.optim.AdamW)
    assert_close(reference_sam_run("adam", ours, steps=4, dtype=dtype), expected, scale=5)
