"""The variant references of variant_reference.py are trustworthy: each one reduces to reference.py's eager
SAM in its degenerate setting, follows its formula on a tiny case worked out here with torch ops (two
parameter tensors, gradients by autograd), skips a step with a non-finite gradient without changing
anything, and runs with the tests' settings far enough from SAM for a comparison to tell them apart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eager_reference import (
    ReferenceSAM,
    assert_models_close,
    assert_models_equal,
    eager_sam_step,
    make_batches,
    make_mlp,
    make_model,
    run,
)
from tolerance import assert_close
from torch import nn
from variant_reference import (
    EPS,
    SETTINGS,
    EagerFisherSAM,
    EagerFriendlySAM,
    EagerGCSAM,
    EagerGSAM,
    EagerSAMStep,
    EagerVaSSO,
    EagerWSAM,
    centred,
    poison,
    proportional_rho,
)

STEPS = 3
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}


class Projection(nn.Module):
    """A fixed (buffer) projection from 6 features to 3 classes plus a trainable 1-d bias."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.randn(6, 3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix + self.bias


def make_vector_model(seed: int = 0) -> nn.Module:
    """A classifier whose parameters are all 1-d (BatchNorm's weight and bias, a bias)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm1d(6), nn.Tanh(), Projection())


def sam_run(model: nn.Module, base_name: str, rho: float, batches) -> None:
    cls, options = BASES[base_name]
    reference = ReferenceSAM.of_model(model, cls(model.parameters(), **options), rho=rho)
    for x, y in batches:
        eager_sam_step(reference, model, x, y)


def variant_run(model: nn.Module, base_name: str, variant_cls, batches, **options):
    cls, base_options = BASES[base_name]
    variant = variant_cls(model, cls(model.parameters(), **base_options), **options)
    run(variant, model, batches)
    return variant


# -------------------------------------------------------------------------- degenerate settings

DEGENERATE = {
    "sam_step": (make_model, EagerSAMStep, {}),
    "gsam_alpha_0": (make_model, EagerGSAM, {"alpha": 0.0}),
    "vasso_theta_1": (make_model, EagerVaSSO, {"theta": 1.0}),
    "friendly_sigma_0": (make_model, EagerFriendlySAM, {"sigma": 0.0, "lambd": 0.6}),
    "fisher_eta_0": (make_model, EagerFisherSAM, {"eta": 0.0}),
    "wsam_coupled_gamma_half": (make_model, EagerWSAM, {"gamma": 0.5, "decoupled": False}),
    "gcsam_vectors_only": (make_vector_model, EagerGCSAM, {}),
}


@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_setting_is_eager_sam(case, base_name):
    """Three steps in the setting where the variant's definition reduces to SAM's equal reference.py's
    eager SAM (the shared iteration itself first, as plain SAM)."""
    make, variant_cls, options = DEGENERATE[case]
    batches = make_batches(STEPS)
    expected, model = make(), make()
    sam_run(expected, base_name, 0.1, batches)
    variant_run(model, base_name, variant_cls, batches, rho=0.1, **options)
    assert_models_close(model, expected)


def test_decoupled_wsam_at_gamma_half_over_plain_sgd_is_sam():
    """alpha = 1 over plain SGD: w - lr g - lr (g_s - g) = w - lr g_s."""
    batches = make_batches(STEPS)
    expected, model = make_model(), make_model()
    reference = ReferenceSAM.of_model(expected, torch.optim.SGD(expected.parameters(), lr=0.1), rho=0.1)
    for x, y in batches:
        eager_sam_step(reference, expected, x, y)
    run(EagerWSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, gamma=0.5), model, batches)
    assert_models_close(model, expected)


@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("name", SETTINGS)
def test_the_tests_settings_are_far_from_sam(name, base_name):
    """Each setting's run moves some weight more than 1e-3 away from SAM's, about 100 times the
    comparison tolerance (1e-6 + 1e-5 |w|, weights of size about 1), so a variant implemented as plain SAM
    fails its comparison."""
    batches = make_batches(STEPS)
    expected, model = make_model(), make_model()
    sam_run(expected, base_name, SETTINGS[name][1]["rho"], batches)
    variant_cls, options = SETTINGS[name]
    variant_run(model, base_name, variant_cls, batches, **options)
    gap = max(float((a - b).detach().abs().max())
              for a, b in zip(model.parameters(), expected.parameters(), strict=True))
    assert gap > 1e-3, gap


# ------------------------------------------------------------------------------ worked examples
# A linear classifier (weight 3x6, bias 3): the loss is written out here, the gradients come from
# autograd in float64, and every formula is applied by hand, tensor by tensor, with plain SGD (and
# SGD with momentum where the base optimizer's place in the update matters).

RHO, LR = 0.5, 0.5


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def data(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batches(2, size=8, seed=5)[step]


def grad_at(weights: list[torch.Tensor], step: int = 0) -> list[torch.Tensor]:
    x, y = data(step)
    weight, bias = (w.detach().double().requires_grad_() for w in weights)
    loss = F.cross_entropy(x.double() @ weight.T + bias, y)
    return list(torch.autograd.grad(loss, [weight, bias]))


def start() -> list[torch.Tensor]:
    return [p.detach().double() for p in linear_model().parameters()]


def norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def sam_point(w: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    n = norm(g)
    return [wi + RHO * gi / (n + EPS) for wi, gi in zip(w, g, strict=True)]


def variant_weights(variant_cls, steps: int = 1, momentum: float = 0.0, **options):
    """The linear model's weights after ``steps`` steps of the reference, and the reference."""
    model = linear_model()
    variant = variant_cls(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum), rho=RHO,
                          **options)
    for step in range(steps):
        variant.step(model, *data(step))
    return [p.detach() for p in model.parameters()], variant


def test_gsam_worked_example():
    alpha = 0.5
    w = start()
    g = grad_at(w)
    gs = grad_at(sam_point(w, g))
    c = sum((a * b).sum() for a, b in zip(g, gs, strict=True)) / (norm(gs) ** 2 + EPS)
    g_perp = [a - c * b for a, b in zip(g, gs, strict=True)]
    assert abs(float(sum((a * b).sum() for a, b in zip(g_perp, gs, strict=True)))) < 1e-12
    d = [b - alpha * v for b, v in zip(gs, g_perp, strict=True)]
    expected = [wi - LR * di for wi, di in zip(w, d, strict=True)]
    actual, _ = variant_weights(EagerGSAM, alpha=alpha)
    assert_close(actual, [e.float() for e in expected])


@pytest.mark.parametrize("decoupled", [True, False])
def test_wsam_worked_example(decoupled):
    """Two steps over SGD with momentum 0.9: decoupled, the sharpness term stays out of the buffer."""
    gamma, mu = 0.75, 0.9
    alpha = gamma / (1 - gamma)
    w, buffer = start(), None
    for step in range(2):
        g = grad_at(w, step)
        gs = grad_at(sam_point(w, g), step)
        d = g if decoupled else [alpha * b + (1 - alpha) * a for a, b in zip(g, gs, strict=True)]
        buffer = d if buffer is None else [mu * b + di for b, di in zip(buffer, d, strict=True)]
        w = [wi - LR * b for wi, b in zip(w, buffer, strict=True)]
        if decoupled:
            w = [wi - LR * alpha * (b - a) for wi, a, b in zip(w, g, gs, strict=True)]
    actual, _ = variant_weights(EagerWSAM, steps=2, momentum=mu, gamma=gamma, decoupled=decoupled)
    assert_close(actual, [e.float() for e in w])


def test_friendly_sam_worked_example():
    sigma, lambd = 0.8, 0.7
    w = start()
    g1 = grad_at(w, 0)  # first step: m = g, SAM's ascent
    m = g1
    w = [wi - LR * b for wi, b in zip(w, grad_at(sam_point(w, g1), 0), strict=True)]
    g2 = grad_at(w, 1)
    u = [a - sigma * mi for a, mi in zip(g2, m, strict=True)]
    m = [lambd * mi + (1 - lambd) * a for mi, a in zip(m, g2, strict=True)]
    n = norm(u)
    gs = grad_at([wi + RHO * ui / (n + EPS) for wi, ui in zip(w, u, strict=True)], 1)
    w = [wi - LR * b for wi, b in zip(w, gs, strict=True)]
    actual, variant = variant_weights(EagerFriendlySAM, steps=2, sigma=sigma, lambd=lambd)
    assert_close(actual, [e.float() for e in w])
    assert_close([variant.state[p]["m"] for p in variant.params], [mi.float() for mi in m])


def test_vasso_worked_example():
    theta = 0.3
    w = start()
    g1 = grad_at(w, 0)  # first step: d = g, SAM's ascent
    w = [wi - LR * b for wi, b in zip(w, grad_at(sam_point(w, g1), 0), strict=True)]
    g2 = grad_at(w, 1)
    d = [(1 - theta) * a + theta * b for a, b in zip(g1, g2, strict=True)]
    n = norm(d)
    gs = grad_at([wi + RHO * di / (n + EPS) for wi, di in zip(w, d, strict=True)], 1)
    w = [wi - LR * b for wi, b in zip(w, gs, strict=True)]
    actual, variant = variant_weights(EagerVaSSO, steps=2, theta=theta)
    assert_close(actual, [e.float() for e in w])
    assert_close([variant.state[p]["d"] for p in variant.params], [di.float() for di in d])


def test_fisher_sam_worked_example():
    eta = 30.0
    w = start()
    g = grad_at(w)
    f = [a / (1 + eta * a * a) for a in g]
    total = sum((a * a / (1 + eta * a * a)).sum() for a in g)
    e = [RHO * fi / torch.sqrt(total + EPS) for fi in f]
    assert float(sum((ei * ei * (1 + eta * a * a)).sum() for ei, a in zip(e, g, strict=True))) == \
        pytest.approx(RHO**2)  # e lies on the Fisher metric's sphere of radius rho
    gs = grad_at([wi + ei for wi, ei in zip(w, e, strict=True)])
    expected = [wi - LR * b for wi, b in zip(w, gs, strict=True)]
    actual, _ = variant_weights(EagerFisherSAM, eta=eta)
    assert_close(actual, [x.float() for x in expected])


def test_gcsam_worked_example():
    w = start()
    g_weight, g_bias = grad_at(w)
    c = [g_weight - g_weight.mean(dim=1, keepdim=True), g_bias]  # rows of the weight centred, bias as is
    assert torch.allclose(c[0].sum(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-15)
    n = norm(c)
    gs = grad_at([wi + RHO * ci / (n + EPS) for wi, ci in zip(w, c, strict=True)])
    expected = [wi - LR * b for wi, b in zip(w, gs, strict=True)]
    actual, _ = variant_weights(EagerGCSAM)
    assert_close(actual, [x.float() for x in expected])


def test_centred_over_every_dimension_but_the_first():
    g = torch.arange(24.0).reshape(2, 3, 4)
    c = centred(g)
    assert torch.allclose(c.sum(dim=(1, 2)), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(c + g.double().reshape(2, -1).mean(dim=1).reshape(2, 1, 1), g.double())
    vector = torch.randn(5)
    assert torch.equal(centred(vector), vector.double())


def test_proportional_rho_endpoints_and_midpoint():
    bounds = {"rho_max": 0.1, "rho_min": 0.02, "lr_max": 0.4, "lr_min": 0.0}
    assert proportional_rho(0.4, **bounds) == pytest.approx(0.1)
    assert proportional_rho(0.0, **bounds) == pytest.approx(0.02)
    assert proportional_rho(0.2, **bounds) == pytest.approx(0.06)


# -------------------------------------------------------------------------------- skipped steps


@pytest.mark.parametrize("name", SETTINGS)
def test_a_skipped_step_changes_nothing(name):
    """Without BatchNorm, a run with steps skipped for a non-finite gradient (the very first one, in the
    ascent; later ones in either pass) equals the run that never saw those batches, bit for bit: weights,
    the base optimizer's state and the variant's own buffers."""
    variant_cls, options = SETTINGS[name]
    batches = make_batches(5)
    expected = make_mlp()
    reference = variant_cls(expected, torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9), **options)
    run(reference, expected, [batches[1], batches[4]])

    model = make_mlp()
    variant = variant_cls(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **options)
    plan = [{"corrupt_ascent": poison(math.nan)}, {}, {"corrupt_descent": poison(math.inf)},
            {"corrupt_ascent": poison(-math.inf)}, {}]
    for (x, y), bad in zip(batches, plan, strict=True):
        weights = [p.detach().clone() for p in model.parameters()]
        own = {p: {k: v.clone() for k, v in entry.items()} for p, entry in variant.state.items()}
        base_state = {p: {k: v.clone() for k, v in entry.items()} for p, entry in variant.base.state.items()}
        assert variant.step(model, x, y, **bad) == bool(bad)
        if bad:
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
            for store, saved in ((variant.state, own), (variant.base.state, base_state)):
                assert {p: set(entry) for p, entry in store.items() if entry} == \
                    {p: set(entry) for p, entry in saved.items() if entry}
                for p, entry in saved.items():
                    assert all(torch.equal(store[p][k], v) for k, v in entry.items())
    assert variant.skipped == [True, False, True, True, False]
    assert_models_equal(model, expected)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert variant.state[p].keys() == reference.state[q].keys()
        assert all(torch.equal(variant.state[p][k], reference.state[q][k]) for k in variant.state[p])
