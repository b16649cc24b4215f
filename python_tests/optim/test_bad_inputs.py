"""Bad input gives a clear error naming the argument; zero and non-finite gradients are handled."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import pairwise_over_backends
from eager_reference import batch_loss, make_batches, make_model
from torch import nn

from sam_kernels.optim import ESAM, SAM

from .test_sam import two_call_step


def params():
    return list(make_model().parameters())


# ------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize(("options", "match"), [
    ({"rho": -0.1}, "rho"), ({"rho": float("nan")}, "rho"),
    ({"rho": torch.tensor(0.05)}, "rho"), ({"sam_eps": 0.0}, "sam_eps"),
    ({"adaptive_eta": -1.0}, "adaptive_eta"),
    ({"seed": -1}, "seed"), ({"fused": True, "foreach": True}, "fused and foreach"),
    ({"backend": "cuda-magic"}, "backend"), ({"maximize": True}, "maximize"),
])
def test_bad_sam_options(options, match):
    with pytest.raises(ValueError, match=match):
        SAM(params(), torch.optim.SGD, lr=0.1, **options)


@pytest.mark.parametrize(("options", "match"), [
    ({"beta": 0.0}, "beta"), ({"beta": 1.5}, "beta"), ({"gamma": 0.0}, "gamma"), ({"gamma": 1.01}, "gamma"),
    ({"swp": "row"}, "swp"),
])
def test_bad_esam_options(options, match):
    with pytest.raises(ValueError, match=match):
        ESAM(params(), torch.optim.SGD, lr=0.1, **options)


def test_bad_group_rho_names_the_group():
    p = params()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['sam_rho'\]"):
        SAM([{"params": p[:2]}, {"params": p[2:], "rho": -1.0}], torch.optim.SGD, lr=0.1)
    sam = SAM(p[:2], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['sam_rho'\]"):
        sam.add_param_group({"params": p[2:], "rho": -0.5})
    assert len(sam.param_groups) == 1


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match=r"params'\]\[0\]: complex"):
        SAM([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], torch.optim.SGD, lr=0.1)


def test_sparse_gradients_are_rejected():
    embedding = nn.Embedding(10, 4, sparse=True)
    sam = SAM(embedding.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: sparse gradient"):
        sam.first_step()


@pytest.mark.parametrize(("base", "options", "match"), [
    (torch.optim.RMSprop, {}, "base_optimizer: RMSprop"),
    (torch.optim.SGD, {"differentiable": True}, "differentiable"),
    (torch.optim.AdamW, {"lr": torch.tensor(0.01)}, r"\['lr'\] is a tensor"),
])
def test_fused_true_names_what_it_cannot_honour(base, options, match):
    with pytest.raises(ValueError, match=f"fused=True: .*{match}"):
        SAM(params(), base, fused=True, **options)
    assert not SAM(params(), base, **options).uses_fused_step  # fused=None: the generic path


def test_bad_base_optimizer_arguments():
    p = params()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(p, "sgd")
    with pytest.raises(TypeError, match="lr: options of the base optimizer"):
        SAM(p, torch.optim.SGD(p, lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="params: differ"):
        SAM(params(), torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="foreach: NoForeach has no foreach option"):
        SAM(p, NoForeach, lr=0.1, foreach=True)


class NoForeach(torch.optim.SGD):
    """An optimizer without a foreach option."""

    def __init__(self, params, lr):
        torch.optim.Optimizer.__init__(self, params, {"lr": lr, "momentum": 0.0})


def test_call_order_errors():
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    with pytest.raises(TypeError, match="closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="no first_step"):
        sam.second_step()
    batch_loss(model, *make_batches(1)[0]).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        sam.first_step()
    with pytest.raises(RuntimeError, match="state_dict"):
        sam.state_dict()
    esam = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, gamma=0.5)
    with pytest.raises(ValueError, match=r"gamma=0\.5: data selection needs per-sample losses"):
        esam.step(lambda: 0.0)


def test_a_failing_second_pass_restores_the_weights():
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second pass")
        loss = batch_loss(model, *make_batches(1)[0])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="second pass"):
        sam.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    sam.state_dict()  # no pending ascent


# ------------------------------------------------------------------------ zero and non-finite grads

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
}


@pytest.mark.parametrize("options", [{}, {"adaptive": True}, {"renormalize": True},
                                     {"normalize_ascent": False}])
def test_zero_gradient_gives_no_nan_and_no_perturbation(backend, options):
    weights = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 3))]
    sam = SAM(weights, torch.optim.SGD, lr=0.1, backend=backend, **options)
    before = [w.detach().clone() for w in weights]
    for w in weights:
        w.grad = torch.zeros_like(w)
    sam.first_step()
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))
    sam.second_step()
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))


def snapshot(model, sam):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy(sam.base_optimizer.state_dict()["state"]))


def assert_unchanged(model, sam, saved):
    weights, state = saved
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    current = sam.base_optimizer.state_dict()["state"]
    assert current.keys() == state.keys()
    for index, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(current[index][key], value), (index, key)


@pairwise_over_backends(base_name=list(BASES), value=[float("nan"), float("inf")],
                        bad_pass=["ascent", "descent"])
def test_non_finite_gradient_skips_the_step(backend, base_name, value, bad_pass):
    base_cls, base_options = BASES[base_name]
    model = make_model()
    sam = SAM(model.parameters(), base_cls, backend=backend, renormalize=True, **base_options)
    assert sam.uses_fused_step == (base_name != "rmsprop")
    (x, y), (x2, y2) = make_batches(2)
    two_call_step(sam, model, x, y)
    saved = snapshot(model, sam)
    poisoned = next(iter(model.parameters()))

    batch_loss(model, x2, y2).backward()
    if bad_pass == "ascent":
        poisoned.grad[0, 0] = value
    sam.first_step(zero_grad=True)
    if bad_pass == "ascent":
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), saved[0], strict=True))
    batch_loss(model, x2, y2).backward()
    if bad_pass == "descent":
        poisoned.grad[0, 0] = value
    sam.second_step(zero_grad=True)
    assert_unchanged(model, sam, saved)

    two_call_step(sam, model, x2, y2)  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), saved[0], strict=True))
