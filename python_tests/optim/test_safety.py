"""No silent corruption: an error inside a step or a load leaves weights and state as they were, ESAM leaves
``requires_grad`` alone, repeated or overlapping parameters are refused, SAM's options never collide with
a base optimizer's, ``rho=0`` is SAM's base optimizer, and misuse is refused early with a clear error."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from cases import on_backends
from eager_reference import (
    ReferenceSAM,
    assert_models_close,
    batch_loss,
    clone_model,
    closure_step,
    eager_sam_step,
    make_batches,
    make_model,
)
from torch import nn

from sam_kernels import backends, ops
from sam_kernels.optim import ESAM, SAM, sample_losses_closure

from .test_esam import per_sample_cross_entropy
from .test_sam import two_call_step


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_weights_equal(model: nn.Module, weights: list[torch.Tensor]) -> None:
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def state_snapshot(optimizer) -> dict:
    return copy.deepcopy(optimizer.base_optimizer.state_dict())


def assert_state_equal(optimizer, snapshot: dict) -> None:
    current = optimizer.base_optimizer.state_dict()
    assert current["param_groups"] == snapshot["param_groups"]
    assert current["state"].keys() == snapshot["state"].keys()
    for index, entry in snapshot["state"].items():
        assert current["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(current["state"][index][key]), torch.as_tensor(value))


def trained_sam(backend: str, base=torch.optim.SGD, steps: int = 2, **options):
    model = make_model()
    sam = SAM(model.parameters(), base, backend=backend, **options)
    for x, y in make_batches(steps, seed=3):
        two_call_step(sam, model, x, y)
    return model, sam


def ascend(model, sam, seed: int = 9) -> None:
    x, y = make_batches(1, seed=seed)[0]
    batch_loss(model, x, y).backward()
    sam.first_step(zero_grad=True)
    batch_loss(model, x, y).backward()


# ------------------------------------------------------------- 1. errors inside the descent


SGD_MOMENTUM = {"lr": 0.1, "momentum": 0.9}


def break_group_option(sam):
    del sam.param_groups[0]["momentum"]


def break_gradient_layout(sam):
    param = sam.param_groups[0]["params"][0]  # a matrix: its transposed copy is a strided view
    param.grad = param.grad.t().contiguous().t()


@pytest.mark.parametrize("breaker", [break_group_option, break_gradient_layout])
def test_an_error_inside_the_fused_descent_leaves_weights_and_state(backend, breaker):
    """The descent raises after first_step: the weights are w bit for bit, the state is untouched, and
    the optimizer can go on once the cause is removed."""
    model, sam = trained_sam(backend, **SGD_MOMENTUM)
    assert sam.uses_fused_step
    weights, state = weights_of(model), state_snapshot(sam)
    ascend(model, sam)
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    saved_groups = [dict(group) for group in sam.param_groups]
    breaker(sam)
    with pytest.raises((KeyError, ValueError)):
        sam.second_step(zero_grad=True)
    assert_weights_equal(model, weights)
    for group, saved in zip(sam.param_groups, saved_groups, strict=True):
        group.update(saved)
    assert_state_equal(sam, state)
    sam.state_dict()  # no ascent pending
    sam.zero_grad()
    two_call_step(sam, model, *make_batches(1, seed=4)[0])


def test_a_bad_state_in_a_later_group_writes_nothing(backend):
    """Two groups, the second one's state does not fit: the step raises before any kernel runs, so the
    first group is neither perturbed nor stepped nor given new state."""
    model = make_model()
    params = list(model.parameters())
    sam = SAM([{"params": params[:2]}, {"params": params[2:]}], torch.optim.SGD, backend=backend,
              **SGD_MOMENTUM)
    weights = weights_of(model)
    sam.state[params[-1]]["momentum_buffer"] = torch.zeros(5)
    batch_loss(model, *make_batches(1)[0]).backward()
    with pytest.raises(ValueError, match="momentum_buffer"):
        sam.first_step()
    assert_weights_equal(model, weights)
    assert all(params[i] not in sam.state for i in range(len(params) - 1))
    sam.state_dict()  # no ascent pending


def test_state_replaced_by_hand_is_checked_after_invalidate_plan(backend):
    """The step plan does not watch entries of ``state`` replaced by hand; ``invalidate_plan()`` makes the
    next step gather (and check) them again, before anything is written."""
    model, sam = trained_sam(backend, **SGD_MOMENTUM)
    weights, state = weights_of(model), state_snapshot(sam)
    param = sam.param_groups[0]["params"][0]
    good = sam.state[param]["momentum_buffer"]
    sam.state[param]["momentum_buffer"] = torch.zeros(7)
    sam.invalidate_plan()
    batch_loss(model, *make_batches(1)[0]).backward()
    with pytest.raises(ValueError, match="momentum_buffer"):
        sam.first_step()
    assert_weights_equal(model, weights)
    sam.state[param]["momentum_buffer"] = good
    assert_state_equal(sam, state)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.RMSprop])
def test_a_failing_base_step_leaves_the_weights(backend, base, monkeypatch):
    model, sam = trained_sam(backend, base, lr=0.01, fused=False if base is torch.optim.SGD else None)
    weights = weights_of(model)
    ascend(model, sam)

    def failing_step(*args, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a partial update before the failure
        raise RuntimeError("base step failed")

    monkeypatch.setattr(sam.base_optimizer, "step", failing_step)
    with pytest.raises(RuntimeError, match="base step failed"):
        sam.second_step()
    assert_weights_equal(model, weights)


def test_an_error_in_a_later_ascent_group_restores_the_earlier_ones(backend, monkeypatch):
    model = make_model()
    params = list(model.parameters())
    sam = SAM([{"params": params[:2]}, {"params": params[2:]}], torch.optim.SGD, lr=0.1, backend=backend)
    weights = weights_of(model)
    batch_loss(model, *make_batches(1)[0]).backward()
    calls = []
    module = backends.get(backend)
    # NOTE: a plan over C++ lists (the native backend) perturbs each group through perturb_rows
    name = "perturb_rows" if hasattr(module, "step_lists") else "perturb_"
    perturb = getattr(module, name)

    def failing_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second group failed")
        perturb(*args, **kwargs)

    monkeypatch.setattr(module, name, failing_second_call)
    with pytest.raises(RuntimeError, match="second group failed"):
        sam.first_step()
    assert len(calls) == 2
    assert_weights_equal(model, weights)
    sam.state_dict()  # no ascent pending


# ------------------------------------------------------------------------------ 2. ESAM flags


def test_esam_leaves_requires_grad_alone(backend):
    """Right after construction and after each kind of step every flag is the user's, a frozen layer
    stays frozen (and its weights do not move), and autograd over the parameters works."""
    model = make_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    flags = [p.requires_grad for p in model.parameters()]
    esam = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, beta=0.3, gamma=1.0, backend=backend, seed=1)
    assert [p.requires_grad for p in model.parameters()] == flags
    trainable = [p for p in model.parameters() if p.requires_grad]
    x, y = make_batches(1)[0]
    torch.autograd.grad(batch_loss(model, x, y), trainable)
    batches = make_batches(6, seed=5)
    for i, (x, y) in enumerate(batches):
        if i % 3 == 0:
            two_call_step(esam, model, x, y)
        elif i % 3 == 1:
            closure_step(esam, model, x, y)
        else:
            esam.gamma = 0.5
            esam.sds_step(sample_losses_closure(model, x, y, per_sample_cross_entropy))
            esam.gamma = 1.0
        assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[0].weight, frozen)


def test_esam_ascent_pass_restores_flags_on_error():
    model = make_model()
    esam = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, beta=0.3, gamma=1.0, backend="torch", seed=1)
    assert esam.dropped_tensors
    with pytest.raises(RuntimeError, match="inside"), esam.ascent_pass():
        assert not all(p.requires_grad for p in model.parameters())
        raise RuntimeError("inside the ascent pass")
    assert all(p.requires_grad for p in model.parameters())


def test_esam_two_call_with_data_selection_is_refused():
    model = make_model()
    esam = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, gamma=0.5, backend="torch")
    weights = weights_of(model)
    batch_loss(model, *make_batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"gamma=0\.5: .*sds_step"):
        esam.first_step()
    assert_weights_equal(model, weights)
    esam.sds_step(sample_losses_closure(model, *make_batches(1)[0], per_sample_cross_entropy))


# ------------------------------------------------------------------ 3. repeated parameters


def test_a_parameter_twice_is_refused():
    p = nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is the same tensor as "
                              r"param_groups\[0\]\['params'\]\[0\]"):
        SAM([p, p], torch.optim.SGD, lr=0.0)
    q = nn.Parameter(torch.randn(3))
    sam = SAM([q], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError):
        sam.add_param_group({"params": [q]})
    assert len(sam.param_groups) == 1


def test_overlapping_parameters_are_refused_and_disjoint_views_accepted():
    storage = torch.randn(10)
    a, b = nn.Parameter(storage[:6]), nn.Parameter(storage[4:])
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] shares memory with .*\['params'\]\[0\]"):
        SAM([a, b], torch.optim.SGD, lr=0.1)
    sam = SAM([{"params": [nn.Parameter(storage[:5])]}], torch.optim.SGD, lr=0.1)
    sam.add_param_group({"params": [nn.Parameter(storage[5:])]})
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['params'\]\[0\] shares memory"):
        sam.add_param_group({"params": [nn.Parameter(storage[3:4])]})
    assert len(sam.param_groups) == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_refuse_repeated_tensors(backend):
    p = torch.randn(5)
    p.grad = torch.randn(5)
    norm, _ = ops.grad_norm([p], backend=backend)
    with pytest.raises(ValueError, match=r"params\[1\]: shares memory with params\[0\]"):
        ops.perturb_([p, p], [torch.empty(5), torch.empty(5)], norm, rho=0.1, backend=backend)


# ------------------------------------------------------------------------ 4. load_state_dict


def test_load_state_dict_with_bad_values_changes_nothing(backend):
    model, sam = trained_sam(backend, **SGD_MOMENTUM)
    good = sam.state_dict()
    snapshot = state_snapshot(sam)
    bad_rho = copy.deepcopy(good)
    bad_rho["param_groups"][0].update(sam_rho=-1.0, lr=123.0)
    bad_lr = copy.deepcopy(good)
    bad_lr["param_groups"][0]["lr"] = -0.5
    bad_sam = [dict(good, sam={"seed": 2**70, "step": 3}), dict(good, sam={"seed": 1, "step": -5}),
               dict(good, sam={"seed": 1, "step": True}), dict(good, sam={"seed": 1})]
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["momentum_buffer"] = torch.zeros(2, 2)
    adam_model = make_model()
    adam = SAM(adam_model.parameters(), torch.optim.Adam, lr=0.01, backend=backend)
    two_call_step(adam, adam_model, *make_batches(1)[0])
    cases = [(bad_rho, "sam_rho"), (bad_lr, "learning rate"), (wrong_shape, "momentum_buffer"),
             (adam.state_dict(), "'momentum'")] + [(entry, r"state_dict\['sam'\]") for entry in bad_sam]
    for state_dict, match in cases:
        with pytest.raises(ValueError, match=match):
            sam.load_state_dict(state_dict)
        assert_state_equal(sam, snapshot)
        assert sam.state_dict()["sam"] == good["sam"]
        assert sam.param_groups is sam.base_optimizer.param_groups and sam.state is sam.base_optimizer.state
    weights = weights_of(model)
    reference = copy.deepcopy((model, sam))
    for x, y in make_batches(2, seed=8):
        two_call_step(sam, model, x, y)
        two_call_step(reference[1], reference[0], x, y)
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference[0].parameters(),
                                                 strict=True))


def test_a_checkpoint_with_unprefixed_sam_options_loads():
    """A state dict whose groups spell SAM's options without the prefix (the popular implementation's
    layout) loads into them."""
    _, sam = trained_sam("torch", lr=0.1)
    state = sam.state_dict()
    for group in state["param_groups"]:
        group["rho"] = 0.2
        del group["sam_rho"]
    sam.load_state_dict(state)
    assert sam.param_groups[0]["sam_rho"] == 0.2 and "rho" not in sam.param_groups[0]


# ------------------------------------------------------- 5. every torch.optim base, no collision


def every_base():
    return sorted(name for name, cls in vars(torch.optim).items()
                  if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)
                  and cls is not torch.optim.Optimizer)


REFUSED = {"LBFGS": "closure", "SparseAdam": "sparse"}
OPTIONS = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Adadelta": {"lr": 0.5, "rho": 0.8}, "Muon": {"lr": 0.02}}


# On Triton: the fused descents (SGD, Adam, AdamW) and one generic descent (Adagrad); the other generic
# descents differ from Adagrad's on the host only.
@on_backends("name", every_base(), triton=["Adagrad", "Adam", "AdamW", "SGD"])
def test_sam_over_every_torch_optimizer(backend, name):
    """SAM over each torch.optim optimizer equals eager SAM over the same optimizer; Adadelta keeps its own
    rho (0.8) beside SAM's (0.1); the refused ones say why at construction."""
    cls = getattr(torch.optim, name)
    if name in REFUSED:
        with pytest.raises(ValueError, match=f"base_optimizer: .*{REFUSED[name]}"):
            SAM(make_model().parameters(), cls, lr=0.1)
        return
    options = OPTIONS.get(name, {"lr": 0.01})
    model = make_model()
    reference_model = clone_model(model)

    def chosen(m):  # Muon takes matrices only
        return [p for p in m.parameters() if p.dim() == 2] if name == "Muon" else list(m.parameters())

    sam = SAM([{"params": chosen(model), **options}], cls, rho=0.1, backend=backend)
    reference = ReferenceSAM([{"params": chosen(reference_model), "rho": 0.1, "adaptive": False, "eta": 0.0}],
                         cls(chosen(reference_model), **options))
    if name == "Adadelta":
        assert sam.param_groups[0]["rho"] == 0.8 and sam.param_groups[0]["sam_rho"] == 0.1
    for x, y in make_batches(3):
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
    assert_models_close(model, reference_model, rtol=1e-4, atol=1e-5)


def test_adadelta_rho_in_a_group_goes_to_adadelta():
    model = make_model()
    sam = SAM([{"params": model.parameters(), "rho": 0.7}], torch.optim.Adadelta, rho=0.02, lr=1.0)
    assert sam.param_groups[0]["rho"] == 0.7 and sam.param_groups[0]["sam_rho"] == 0.02
    sam_by_instance = SAM(None, torch.optim.Adadelta(make_model().parameters(), rho=0.6), rho=0.03)
    assert sam_by_instance.param_groups[0]["rho"] == 0.6
    assert sam_by_instance.param_groups[0]["sam_rho"] == 0.03


# --------------------------------------------------------------------------------- 6. rho = 0


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW, torch.optim.RMSprop])
def test_rho_zero_is_the_base_optimizer(backend, base):
    model = make_model()
    plain_model = clone_model(model)
    options = {"lr": 0.05, "momentum": 0.9} if base is torch.optim.SGD else {"lr": 0.01}
    sam = SAM(model.parameters(), base, rho=0.0, backend=backend, **options)
    plain = base(plain_model.parameters(), **options)
    for x, y in make_batches(3):
        batch_loss(model, x, y).backward()
        weights = weights_of(model)
        sam.first_step(zero_grad=True)
        assert_weights_equal(model, weights)  # e = 0
        batch_loss(model, x, y).backward()
        sam.second_step(zero_grad=True)
        plain.zero_grad()
        batch_loss(plain_model, x, y).backward()
        plain.step()
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):  # (BatchNorm saw 2 batches)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- 7. refused early, clearly


def test_unusable_bases_are_refused_at_construction():
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match="base_optimizer: LBFGS"):
        SAM(params, torch.optim.LBFGS, lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer: SparseAdam"):
        SAM(params, torch.optim.SparseAdam, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer: SAM is a SAM optimizer"):
        SAM(params, SAM, lr=0.1)
    inner = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer: SAM is a SAM optimizer"):
        SAM(None, inner)
    with pytest.raises(TypeError, match="base_optimizer: ESAM is a SAM optimizer"):
        SAM(None, ESAM(list(make_model().parameters()), torch.optim.SGD, lr=0.1))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_gradient_in_another_layout_error_names_the_gradient(layout):
    """A gradient laid out unlike its parameter (any layout is fine when they agree) is refused with a
    fix about the gradient, not the parameters."""
    weight = nn.Parameter(torch.randn(3, 4))
    sam = SAM([weight], torch.optim.SGD, lr=0.1, backend="torch")
    weight.grad = torch.randn(4, 3).t() if layout == "transposed" else torch.randn(3, 8)[:, ::2]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: its gradient has strides "
                                         r".*torch\.empty_like\(param\)\.copy_\(grad\)") as error:
        sam.first_step()
    assert "parameters contiguous" not in str(error.value)


@pytest.mark.parametrize("name", [n for n in every_base() if n not in REFUSED])
def test_every_torch_optimizer_checkpoint_loads_back(name):
    """state_dict -> load_state_dict round-trips over each torch.optim base (its own checks included)."""
    cls = getattr(torch.optim, name)
    model = make_model()
    params = [p for p in model.parameters() if p.dim() == 2] if name == "Muon" else list(model.parameters())
    sam = SAM(params, cls, backend="torch", **OPTIONS.get(name, {"lr": 0.01}))
    two_call_step(sam, model, *make_batches(1)[0])
    state = copy.deepcopy(sam.state_dict())
    sam.load_state_dict(state)
    assert sam.state_dict()["sam"] == state["sam"]


def test_eps_goes_to_the_base_optimizer():
    """``eps`` is the base optimizer's (Adam's 1e-8 by default); SAM's own epsilon is ``sam_eps``."""
    sam = SAM(make_model().parameters(), torch.optim.Adam, lr=0.01, eps=1e-3, sam_eps=1e-9)
    assert sam.param_groups[0]["eps"] == 1e-3 and sam.eps == 1e-9
    with pytest.raises(TypeError, match="eps"):
        SAM(make_model().parameters(), torch.optim.SGD, lr=0.1, eps=1e-3)
