"""step(closure) in both closure conventions, passes counted: torch.optim's (the closure zeroes, computes
and backpropagates; SAM calls it at w and at w + e) and the popular SAM implementation's README loop (the
loop runs the first backward itself, the closure only computes and backpropagates, zero_grad after the
step), which must cost two passes, not three, and give eager SAM's weights."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from eager_reference import (
    ReferenceSAM,
    assert_models_close,
    batch_loss,
    closure_step,
    eager_sam_step,
    make_batches,
    make_model,
)

from sam_kernels.optim import SAM, Interval, closure_convention

STEPS = 4


@pytest.fixture(autouse=True, params=["native", "python"])
def records(request, monkeypatch):
    """Every test runs with the gradient records of the extension (csrc/grad_marks.cpp) and with the
    Python ones (an install without the extension); each warns anew."""
    monkeypatch.setattr(closure_convention, "_warned", set())
    if request.param == "python":
        monkeypatch.setattr(closure_convention, "_NATIVE_MARKS", None)
    elif closure_convention._NATIVE_MARKS is None:
        pytest.skip("the native extension is not built")
    return request.param

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}


class PassCounter:
    """Counts the model's forward passes (a forward hook on the model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1


def popular_step(optimizer, model, x, y) -> object:
    """One iteration of the popular SAM README loop: the first backward is the loop's, the closure only
    computes and backpropagates (no zero_grad), and zero_grad follows the step."""
    def closure():
        loss = batch_loss(model, x, y)
        loss.backward()
        return loss
    loss = batch_loss(model, x, y)
    loss.backward()
    result = optimizer.step(closure)
    optimizer.zero_grad()
    return result


def eager_run(base: str, batches):
    model = make_model()
    cls, kwargs = BASES[base]
    ref = ReferenceSAM.of_model(model, cls(model.parameters(), **kwargs), rho=0.05)
    for x, y in batches:
        eager_sam_step(ref, model, x, y)
    return model


@pytest.mark.parametrize("base", sorted(BASES))
def test_popular_closure_loop_costs_two_passes_and_matches_eager_sam(base):
    batches = make_batches(STEPS)
    model = make_model()
    counter = PassCounter(model)
    cls, kwargs = BASES[base]
    optimizer = SAM(model.parameters(), cls, rho=0.05, **kwargs)
    for x, y in batches:
        before = counter.count
        assert popular_step(optimizer, model, x, y) is None  # the loss at w is the loop's own
        assert counter.count - before == 2
    assert_models_close(model, eager_run(base, batches))


@pytest.mark.parametrize("base", sorted(BASES))
def test_torch_convention_runs_the_closure_twice_with_old_gradients_left(base):
    """Lightning's loop: no zero_grad between steps (the closure zeroes), so the previous step's second
    gradients are still there when step(closure) starts; they must not count as a first pass."""
    batches = make_batches(STEPS)
    model = make_model()
    cls, kwargs = BASES[base]
    optimizer = SAM(model.parameters(), cls, rho=0.05, **kwargs)
    for x, y in batches:
        calls: list = []
        closure_step(optimizer, model, x, y, calls)
        assert len(calls) == 2
        assert all(p.grad is not None for p in model.parameters())
    assert_models_close(model, eager_run(base, batches))


def test_torch_convention_after_zero_grad_in_place():
    """optimizer.zero_grad(set_to_none=False) writes the gradients in place; they are not a first pass."""
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    for x, y in make_batches(2):
        optimizer.zero_grad(set_to_none=False)
        calls: list = []
        closure_step(optimizer, model, x, y, calls)
        assert len(calls) == 2


def test_both_conventions_in_one_run_match_eager_sam():
    """A loop that zeroes after every step may switch closure styles: each step costs two passes."""
    batches = make_batches(STEPS)
    model = make_model()
    counter = PassCounter(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **BASES["sgd"][1])
    for index, (x, y) in enumerate(batches):
        before = counter.count
        if index % 2:
            popular_step(optimizer, model, x, y)
        else:
            closure_step(optimizer, model, x, y)
            optimizer.zero_grad()
        assert counter.count - before == 2
    assert_models_close(model, eager_run("sgd", batches))


def test_popular_loop_on_plain_steps_of_a_schedule_costs_one_pass():
    model = make_model()
    counter = PassCounter(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, schedule=Interval(2))
    passes = []
    for x, y in make_batches(STEPS):
        before = counter.count
        popular_step(optimizer, model, x, y)
        passes.append(counter.count - before)
    assert passes == [2, 1, 2, 1]


def test_stale_gradients_after_a_two_call_step_warn_once_and_run_torch_convention():
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    (x, y), *rest = make_batches(3)
    batch_loss(model, x, y).backward()
    optimizer.first_step(zero_grad=True)
    batch_loss(model, x, y).backward()
    optimizer.second_step()  # leaves the second gradients, undated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in rest:
            calls: list = []
            closure_step(optimizer, model, x, y, calls)
            assert len(calls) == 2
    messages = [str(w.message) for w in caught if "cannot date" in str(w.message)]
    assert len(messages) == 1 and "zero_grad()" in messages[0]


def test_ascent_context_left_out_by_a_popular_step_warns():
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    entered = []
    optimizer.ascent_context = lambda: _Recorder(entered)
    (x, y), = make_batches(1)
    with pytest.warns(UserWarning, match="outside ascent_context"):
        popular_step(optimizer, model, x, y)
    assert entered == []
    closure_step(optimizer, model, x, y)
    assert entered == [1]  # torch's convention: the closure's first call runs inside it


class _Recorder:
    def __init__(self, entered: list) -> None:
        self.entered = entered

    def __enter__(self) -> None:
        self.entered.append(1)

    def __exit__(self, *exc) -> None:
        return None


def test_an_optimizer_with_a_record_copies_and_pickles():
    """A copy has no record of its gradients (weak references neither copy nor pickle): torch's convention
    still runs the closure twice on it."""
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    (x, y), = make_batches(1)
    closure_step(optimizer, model, x, y)  # leaves a record of the gradients
    pickle.loads(pickle.dumps((model, optimizer)))
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    calls: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        closure_step(optimizer_copy, model_copy, x, y, calls)
    assert len(calls) == 2


def test_groups_holding_tuples_are_recorded():
    """torch's convention over param groups whose "params" a user replaced by tuples: the record still
    sees their gradients, so the closure runs twice on every step."""
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    for group in optimizer.param_groups:
        group["params"] = tuple(group["params"])
    for x, y in make_batches(3):
        calls: list = []
        closure_step(optimizer, model, x, y, calls)
        assert len(calls) == 2
