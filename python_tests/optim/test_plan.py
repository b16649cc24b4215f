"""The step plan is rebuilt on every change it depends on: each trigger is applied between steps, and the
trajectory that follows must equal the one of a freshly built optimizer loaded from a checkpoint of the
same moment (a stale plan would write into old storage, skip a parameter or misread the state)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from cases import on_backends, pairwise_over_backends
from eager_reference import assert_models_equal, batch_loss, closure_step, make_batches, make_model
from targets import require

from sam_kernels.backends import native_backend
from sam_kernels.optim import ESAM, SAM

from .test_sam import two_call_step

OPTIMIZERS = {
    "sgd": lambda params, backend: SAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend,
                                       seed=3),
    "adamw": lambda params, backend: SAM(params, torch.optim.AdamW, lr=0.01, backend=backend, seed=3),
    "rmsprop": lambda params, backend: SAM(params, torch.optim.RMSprop, lr=0.01, backend=backend, seed=3),
    "esam": lambda params, backend: ESAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, beta=0.5,
                                         gamma=1.0, backend=backend, seed=3),
}

#: The optimizers whose plans hold Triton launch tables of their own kind (the fused SGD and Adam
#: descents); RMSprop's and ESAM's rebuilds on Triton run under -m slow.
TRITON_OPTIMIZERS = ["sgd", "adamw"]


def continue_against_fresh(model, optimizer, make, backend, steps: int = 2, count: int | None = None):
    """Train ``model`` on with ``optimizer`` and, side by side, a deep copy with a fresh optimizer (over
    the first ``count`` parameters, default all) loaded from ``optimizer``'s state dict; both must end
    bit for bit equal."""
    model.zero_grad()  # deepcopy drops gradients; parameters outside the optimizer may hold some
    fresh_model = copy.deepcopy(model)
    fresh = make(list(fresh_model.parameters())[:count], backend)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for x, y in make_batches(steps, seed=21):
        two_call_step(optimizer, model, x, y)
        two_call_step(fresh, fresh_model, x, y)
    assert_models_equal(model, fresh_model)
    return fresh_model


def replace_storage(model):
    """``.data`` of every parameter replaced by a copy in new storage (what ``model.to`` does)."""
    for p in model.parameters():
        p.data = p.data.clone()


def reshape_last_layer(model):
    """The last layer's parameters replaced by ones of another shape (and storage)."""
    layer = model[3]
    layer.weight.data = torch.randn(3, 10).mul_(0.1)
    layer.bias.data = torch.randn(3)


def transpose_layout(model):
    """Every matrix moved to the transposed memory layout (dense, not contiguous), as
    ``model.to(memory_format=torch.channels_last)`` does to convolutions; the optimizer state keeps the
    old layout and must be laid out anew."""
    for p in model.parameters():
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()


TRIGGERS = {"storage": replace_storage, "shape": reshape_last_layer, "layout": transpose_layout}


@pairwise_over_backends(name=list(OPTIMIZERS), trigger=list(TRIGGERS))
def test_parameter_change_rebuilds_the_plan(backend, name, trigger):
    make = OPTIMIZERS[name]
    model = make_model()
    optimizer = make(model.parameters(), backend)
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    if trigger != "storage":
        optimizer.state.clear()  # state of the old shapes cannot carry over
    TRIGGERS[trigger](model)
    before = [p.detach().clone() for p in model.parameters()]
    continue_against_fresh(model, optimizer, make, backend)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@on_backends("name", list(OPTIMIZERS), triton=TRITON_OPTIMIZERS)
def test_gradient_set_change_rebuilds_the_plan(backend, name):
    """A parameter without a gradient for two steps, then with one (and the reverse)."""
    make = OPTIMIZERS[name]
    model = make_model()
    optimizer = make(model.parameters(), backend)
    head = list(model[3].parameters())
    for p in head:
        p.requires_grad_(False)
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    for p in head:
        p.requires_grad_(True)
    fresh_model = continue_against_fresh(model, optimizer, make, backend)
    for p in list(model[0].parameters()) + list(fresh_model[0].parameters()):
        p.requires_grad_(False)
    continue_against_fresh(model, optimizer, make, backend)


@on_backends("name", list(OPTIMIZERS), triton=TRITON_OPTIMIZERS)
def test_state_and_groups_changes_rebuild_the_plan(backend, name):
    """A state dict loaded into the base optimizer directly (a new state object), a param group added,
    and a group's hyper-parameters edited (read at every step)."""
    make = OPTIMIZERS[name]
    model = make_model()
    params = list(model.parameters())
    optimizer = make(params[:2], backend)
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    checkpoint = copy.deepcopy(optimizer.base_optimizer.state_dict())
    for x, y in make_batches(1, seed=5):
        two_call_step(optimizer, model, x, y)
    optimizer.base_optimizer.load_state_dict(checkpoint)
    continue_against_fresh(model, optimizer, make, backend, count=2)
    optimizer.add_param_group({"params": params[2:]})
    optimizer.param_groups[0]["lr"] *= 0.5
    model.zero_grad()
    fresh_model = copy.deepcopy(model)
    fresh = make(list(fresh_model.parameters())[:2], backend)
    fresh.add_param_group({"params": list(fresh_model.parameters())[2:]})
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for x, y in make_batches(2, seed=7):
        two_call_step(optimizer, model, x, y)
        two_call_step(fresh, fresh_model, x, y)
    assert_models_equal(model, fresh_model)


def test_a_step_reuses_the_plan(backend):
    """No trigger, no rebuild: the plan object survives steps (and LR changes) once the first step
    has created the optimizer state (a new state entry count is a trigger)."""
    model = make_model()
    optimizer = OPTIMIZERS["sgd"](model.parameters(), backend)
    batches = make_batches(5)
    for x, y in batches[:2]:
        two_call_step(optimizer, model, x, y)
    plan = optimizer._run.plan
    for x, y in batches[2:]:
        optimizer.param_groups[0]["lr"] *= 0.9
        two_call_step(optimizer, model, x, y)
    assert optimizer._run.plan is plan
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert optimizer._run.plan is None


@on_backends("name", list(OPTIMIZERS), triton=TRITON_OPTIMIZERS)
def test_dtype_change_rebuilds_the_plan(backend, name):
    """Parameters cast to bfloat16 between steps (``model.to(torch.bfloat16)`` does this)."""
    make = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(4, 3), (3,), (5,)]]
    targets = [torch.randn(p.shape, generator=generator) for p in params]

    def run(weights, optimizer, steps):
        for _ in range(steps):
            for _ in range(2):
                sum(((w.float() - t) ** 2 * (1 + w.float() ** 2)).sum() for w, t in zip(weights, targets))\
                    .backward()
                if optimizer._run.ascent is None:
                    optimizer.first_step(zero_grad=True)
                else:
                    optimizer.second_step(zero_grad=True)

    optimizer = make(params, backend)
    run(params, optimizer, 2)
    optimizer.state.clear()
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = make(twins, backend)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    before = [p.detach().clone() for p in params]
    run(params, optimizer, 2)
    run(twins, fresh, 2)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(torch.equal(a, b) for a, b in zip(params, twins, strict=True))
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_cleared_state_and_replaced_group_dicts_rebuild_the_plan(backend):
    """``state.clear()`` (same dict object) and a group dict replaced in ``param_groups`` are seen."""
    model = make_model()
    optimizer = OPTIMIZERS["adamw"](model.parameters(), backend)
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    optimizer.state.clear()
    continue_against_fresh(model, optimizer, OPTIMIZERS["adamw"], backend)
    assert len(optimizer.state) == len(list(model.parameters()))
    optimizer.param_groups[0] = dict(optimizer.param_groups[0], lr=0.0)
    frozen = [p.detach().clone() for p in model.parameters()]
    two_call_step(optimizer, model, *make_batches(1, seed=3)[0])
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), frozen, strict=True))


@pytest.mark.parametrize("switch", ["off", "on"])
def test_momentum_switched_rebuilds_the_plan(backend, switch):
    """SGD's momentum switched off (the fused step drops its buffer operand) or on (buffers created
    then) between steps: the trajectory equals a fresh optimizer's loaded from the same moment."""
    make = OPTIMIZERS["sgd"]
    model = make_model()
    optimizer = make(model.parameters(), backend)
    if switch == "on":
        optimizer.param_groups[0]["momentum"] = 0.0
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    optimizer.param_groups[0]["momentum"] = 0.9 if switch == "on" else 0.0
    continue_against_fresh(model, optimizer, make, backend)


def test_options_changed_between_the_passes_are_seen(backend):
    """AMSGrad switched on between first_step and second_step: the descent rebuilds its plan (from w)
    instead of failing half-way or using stale operand lists."""
    model = make_model()
    optimizer = OPTIMIZERS["adamw"](model.parameters(), backend)
    two_call_step(optimizer, model, *make_batches(1)[0])
    x, y = make_batches(1, seed=4)[0]
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    optimizer.param_groups[0]["amsgrad"] = True
    batch_loss(model, x, y).backward()
    optimizer.second_step(zero_grad=True)
    assert all("max_exp_avg_sq" in optimizer.state[p] for p in model.parameters())


def test_esam_keeps_its_plan_across_steps(backend):
    """ESAM's dropped tensors have no ascent gradient inside ascent_pass: the plan allows exactly those
    to lack one instead of being rebuilt twice per step."""
    model = make_model()
    optimizer = ESAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, beta=0.5, gamma=1.0,
                     backend=backend, seed=3)
    plans = []
    for x, y in make_batches(6):
        closure_step(optimizer, model, x, y)
        plans.append(optimizer._run.plan)
    assert len({id(plan) for plan in plans[2:]}) == 1


# ----------------------------------------------------------------- the native plan's C++ lists (plan.py)

CPP_LISTS_OPTIMIZERS = {name: OPTIMIZERS[name] for name in ("sgd", "adamw", "esam")}


@pytest.mark.parametrize("name", list(CPP_LISTS_OPTIMIZERS))
def test_native_steps_take_their_lists_in_cpp(name, monkeypatch):
    """On the native backend a step calls no op with Python lists once the plan is built: the norms,
    perturbations and descents go through the plan's C++ lists (ESAM's dropped tensors included), and the
    trajectory is bit for bit the one of the same optimizer over Python lists."""
    require("native")
    make = CPP_LISTS_OPTIMIZERS[name]
    model = make_model()
    twin_model = copy.deepcopy(model)
    optimizer, twin = make(model.parameters(), "native"), make(twin_model.parameters(), "native")
    batches = make_batches(4)
    for x, y in batches[:1]:  # the first step creates the state and builds the final plan
        two_call_step(optimizer, model, x, y)
        two_call_step(twin, twin_model, x, y)
    assert optimizer._run.plan.lists is not None
    python_calls = []
    names = ("grad_norm", "perturb_", "restore_", "restore_sgd_step_", "restore_adam_step_")
    real = {op: getattr(native_backend, op) for op in names}

    def counted(op):
        def call(*args, **kwargs):
            python_calls.append(op)
            return real[op](*args, **kwargs)
        return call

    for op in real:
        monkeypatch.setattr(native_backend, op, counted(op))
    for x, y in batches[1:]:
        two_call_step(optimizer, model, x, y)
    assert python_calls == []
    with monkeypatch.context() as without_lists:  # the twin's plan is rebuilt without C++ lists
        without_lists.delattr(native_backend, "step_lists")
        twin.invalidate_plan()
        for x, y in batches[1:]:
            two_call_step(twin, twin_model, x, y)
    assert twin._run.plan.lists is None and python_calls
    assert_models_equal(model, twin_model)


def test_the_plan_lets_go_of_the_gradients():
    """After each pass the C++ lists hold no gradient: zero_grad(set_to_none=True) frees them."""
    require("native")
    model = make_model()
    optimizer = OPTIMIZERS["sgd"](model.parameters(), "native")
    x, y = make_batches(1)[0]
    batch_loss(model, x, y).backward()
    first = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.first_step(zero_grad=True)
    assert all(ref() is None for ref in first)
    batch_loss(model, x, y).backward()
    second = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.second_step(zero_grad=True)
    assert all(ref() is None for ref in second)


def test_a_parameter_object_replaced_in_its_group_rebuilds_the_plan(backend):
    """The plan holds the param groups' parameter objects: one replaced by another over the same storage
    (nothing else about the plan changes) is seen, and the step uses the new one's gradient and state."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    optimizer = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones(4)
        optimizer.first_step()
        optimizer.second_step()
    replacement = torch.nn.Parameter(params[1].data)  # the same storage, a new parameter object
    before = params[1].detach().clone()
    optimizer.param_groups[0]["params"][1] = replacement
    for p in params:
        p.grad = torch.ones(4)
    replacement.grad = torch.full((4,), 2.0)
    optimizer.first_step()
    optimizer.second_step()
    # the replacement's first momentum step: buf = g, w -= lr * g
    torch.testing.assert_close(replacement.detach(), before - 0.1 * 2.0, rtol=0, atol=1e-6)
    assert "momentum_buffer" in optimizer.state[replacement]


def test_a_copy_made_while_perturbed_restores_through_python_lists(backend):
    """A deep copy of an optimizer between first_step and second_step has no C++ lists (they do not
    copy); its descent still starts from the copied w: the same weights as the original's descent."""
    model = make_model()
    optimizer = OPTIMIZERS["esam"](model.parameters(), backend)
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    x, y = make_batches(1, seed=9)[0]
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    batch_loss(model, x, y).backward()
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    for p, q in zip(model.parameters(), model_copy.parameters(), strict=True):
        q.grad = p.grad.clone()
    optimizer.second_step()
    optimizer_copy.second_step()
    assert_models_equal(model, model_copy)


def test_collected_gradients_are_read_once_and_not_after_their_pass():
    """A native plan's gradients become a Python list on the first read (the parameters' own gradient
    tensors, in plan order), and reading them after the pass ended raises instead of answering with a
    later pass's gradients."""
    require("native")
    model = make_model()
    optimizer = OPTIMIZERS["sgd"](model.parameters(), "native")
    batch_loss(model, *make_batches(1)[0]).backward()
    plan, grads = optimizer._plan()
    read = grads[0:len(grads)]
    assert all(g is p.grad for g, p in zip(read, model.parameters(), strict=True))
    assert grads[0:len(grads)] is not read and list(grads) == read
    unread = plan.grads()  # a new collect ends the pass of ``grads``
    assert list(grads) == read  # already a list: still readable
    plan.release()
    with pytest.raises(RuntimeError, match="after the pass ended"):
        unread[0]


def test_groups_holding_tuples_keep_their_plan_and_their_ascent_steps(backend):
    """A param group whose "params" a user replaced by a tuple is checked like a list: the plan is not
    rebuilt every step, so a multi-step ascent keeps its plan between its steps."""
    from sam_kernels.optim import MultiStepSAM
    model = make_model()
    optimizer = MultiStepSAM(model.parameters(), torch.optim.SGD, lr=0.05, ascent_steps=2, backend=backend)
    for group in optimizer.param_groups:
        group["params"] = tuple(group["params"])
    plans = []
    for x, y in make_batches(3):
        batch_loss(model, x, y).backward()
        optimizer.first_step(zero_grad=True)
        batch_loss(model, x, y).backward()
        optimizer.first_step(zero_grad=True)
        batch_loss(model, x, y).backward()
        optimizer.second_step(zero_grad=True)
        plans.append(optimizer._run.plan)
    assert plans[1] is plans[2]


def test_a_copy_restores_when_a_whole_group_sat_out_the_ascent():
    """ESAM dropping every tensor of a group: a copy made while perturbed (no C++ lists) puts back
    exactly the weights of the groups that moved."""
    require("native")
    torch.manual_seed(0)
    for seed in range(64):  # a seed whose draw drops the second group's only tensor
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
        optimizer = ESAM([{"params": list(model[0].parameters())}, {"params": list(model[1].parameters())}],
                         torch.optim.SGD, lr=0.1, beta=0.5, gamma=1.0, seed=seed, backend="native")
        model(torch.randn(5, 4)).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.first_step(zero_grad=True)
        kept = optimizer._run.ascent.kept
        if kept is not None and not kept[-1] and any(kept):
            break
    else:
        pytest.fail("no seed dropped the second group")
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    optimizer_copy._abandon_ascent()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model_copy.parameters(), before, strict=True))


def test_a_policy_reads_the_gradients_in_after_step(backend):
    """``StepContext.grads`` is readable in every hook of a step, ``after_step`` included."""
    from sam_kernels.optim.policy import Policy

    class Reading(Policy):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list = []

        def after_step(self, context) -> None:
            self.seen.append([g is p.grad for g, p in zip(context.grads, context.plan.params, strict=True)])

    model = make_model()
    policy = Reading()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.05, backend=backend, policy=policy)
    for x, y in make_batches(2):
        two_call_step(optimizer, model, x, y)
    assert len(policy.seen) == 2 and all(all(row) for row in policy.seen)


def test_zero_grad_frees_the_gradients_after_an_error_in_a_step(monkeypatch):
    """An error inside the ascent leaves no gradient held by the plan once zero_grad() ran."""
    require("native")
    model = make_model()
    optimizer = SAM([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}],
                    torch.optim.SGD, lr=0.05, backend="native")
    x, y = make_batches(1)[0]
    batch_loss(model, x, y).backward()

    def failing(*args, **kwargs):
        raise RuntimeError("perturb failed")

    monkeypatch.setattr(native_backend, "perturb_rows", failing)
    with pytest.raises(RuntimeError, match="perturb failed"):
        optimizer.first_step()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.zero_grad()
    assert all(ref() is None for ref in refs)
