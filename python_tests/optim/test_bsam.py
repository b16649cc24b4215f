"""BayesianSAM (bSAM) against the eager reference written from the paper (bsam_reference.py), on every op
backend: parity, the calling styles, the noise's bit-identity across backends, exact restores, resume,
non-finite gradients, errors inside a step and bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from bsam_reference import ReferenceBSAM
from targets import require
from tensors import make_tensors
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels.backends import reference
from sam_kernels.optim.bsam import BayesianSAM

SHAPES = [(5, 3), (3,)]
OPTIONS = {"num_data": 1000.0, "lr": 0.05, "betas": (0.8, 0.99), "rho": 0.02, "weight_decay": 1e-3,
           "damping": 0.1, "init_precision": 2.0}
SEED = 2**40 + 17


def _data():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(16, 5, generator=generator), torch.randn(16, 3, generator=generator)


def loss_of(params, data):
    weight, bias = params
    x, y = data
    x, y = x.to(weight.dtype), y.to(weight.dtype)
    return ((torch.tanh(x @ weight + bias) - y) ** 2).mean()


def _params(dtype):
    return [p.requires_grad_(True) for p in make_tensors(SHAPES, dtype, 1)]


def _two_call_step(optimizer, params, data, poison=None):
    """One step in the two-call style; ``poison`` ("first"/"second") puts a NaN in that pass's gradient."""
    optimizer.sample_noise()
    loss_of(params, data).backward()
    if poison == "first":
        params[1].grad[0] = float("nan")
    optimizer.first_step(zero_grad=True)
    loss_of(params, data).backward()
    if poison == "second":
        params[0].grad[1, 1] = float("inf")
    optimizer.second_step(zero_grad=True)


def _noises(step):
    """The standard normals the contract gives each parameter at ``step`` (seed SEED, global positions)."""
    return [reference.gaussian_noise(torch.Size(s).numel(), index, SEED, step).reshape(s)
            for index, s in enumerate(SHAPES)]


def _state(optimizer, params):
    return [t.clone() for p in params for t in (p.detach(), *(optimizer.state[p][k] for k in ("exp_avg",
                                                                                            "precision")))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_the_reference(backend, dtype):
    data = _data()
    params = _params(dtype)
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
    expected = ReferenceBSAM(params, **OPTIONS)
    for step in range(5):
        _two_call_step(optimizer, params, data)
        expected.step(lambda ps: loss_of(ps, data), _noises(step))
    scale = 10.0 if dtype == torch.float64 else 20.0  # five steps of reordered float arithmetic
    for param, ref_param, m, s in zip(params, expected.params, expected.exp_avgs, expected.precisions,
                                      strict=True):
        assert_close(param.detach(), ref_param.to(dtype), scale=scale)
        assert_close(optimizer.state[param]["exp_avg"], m.to(dtype), scale=scale)
        assert_close(optimizer.state[param]["precision"], s.to(dtype), scale=scale)
    assert optimizer.step_count == 5


def test_noise_and_steps_are_bit_identical_across_backends():
    """The noise is the contract's on every backend, so whole trajectories agree bit for bit."""
    data = _data()
    results = {}
    for backend in ("torch", "triton", "native"):
        require(backend)
        params = _params(torch.float32)
        optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
        before = [p.detach().clone() for p in params]
        optimizer.sample_noise()
        noisy = [p.detach().clone() for p in params]
        for sampled, mean, z, precision in zip(noisy, before, _noises(0), [2.0, 2.0], strict=True):
            expected = mean + z / torch.tensor(OPTIONS["num_data"] * precision).sqrt()
            assert_close(sampled, expected)
        optimizer.abandon_step()
        assert_bitwise_equal([p.detach() for p in params], before)
        for _ in range(3):
            _two_call_step(optimizer, params, data)
        results[backend] = (noisy, _state(optimizer, params))
    for backend, result in results.items():
        assert_bitwise_equal(result[0], results["torch"][0], backend)
        assert_bitwise_equal(result[1], results["torch"][1], backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_parameters(backend, dtype):
    """16-bit parameters keep 16-bit state and follow the float32 run to their precision."""
    data = _data()
    params = _params(dtype)
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
    full = _params(torch.float32)
    optimizer32 = BayesianSAM(full, seed=SEED, backend=backend, **OPTIONS)
    for _ in range(2):
        _two_call_step(optimizer, params, data)
        _two_call_step(optimizer32, full, data)
    for param, param32 in zip(params, full, strict=True):
        assert optimizer.state[param]["precision"].dtype == dtype
        assert_close(param.detach(), param32.detach().to(dtype), scale=4.0)


def test_closure_step_equals_the_two_call_step(backend):
    data = _data()
    params, closure_params = _params(torch.float32), _params(torch.float32)
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
    closure_optimizer = BayesianSAM(closure_params, seed=SEED, backend=backend, **OPTIONS)

    def closure():
        closure_optimizer.zero_grad()
        loss = loss_of(closure_params, data)
        loss.backward()
        return loss

    for _ in range(3):
        _two_call_step(optimizer, params, data)
        loss = closure_optimizer.step(closure)
        assert loss is not None and torch.isfinite(loss)
    assert_bitwise_equal(_state(closure_optimizer, closure_params), _state(optimizer, params))


def test_noise_and_ascent_are_undone_exactly(backend):
    """With lr = 0 the update leaves w as it was: nothing of the sample or the ascent stays behind."""
    data = _data()
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **{**OPTIONS, "lr": 0.0})
    for _ in range(2):
        _two_call_step(optimizer, params, data)
    assert_bitwise_equal([p.detach() for p in params], before)


def test_resume_equals_the_uninterrupted_run(backend):
    data = _data()
    params = _params(torch.float32)
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
    for _ in range(4):
        _two_call_step(optimizer, params, data)

    first = _params(torch.float32)
    first_optimizer = BayesianSAM(first, seed=SEED, backend=backend, **OPTIONS)
    for _ in range(2):
        _two_call_step(first_optimizer, first, data)
    saved = copy.deepcopy(first_optimizer.state_dict())
    resumed = [p.detach().clone().requires_grad_(True) for p in first]
    resumed_optimizer = BayesianSAM(resumed, seed=1, backend=backend, **OPTIONS)  # the seed comes back
    resumed_optimizer.load_state_dict(saved)
    assert resumed_optimizer.seed == SEED and resumed_optimizer.step_count == 2
    for _ in range(2):
        _two_call_step(resumed_optimizer, resumed, data)
    assert_bitwise_equal(_state(resumed_optimizer, resumed), _state(optimizer, params))


@pytest.mark.parametrize("poison", ["first", "second"])
def test_non_finite_gradient_skips_the_step(backend, poison):
    data = _data()
    params = _params(torch.float32)
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
    _two_call_step(optimizer, params, data)
    before = _state(optimizer, params)
    _two_call_step(optimizer, params, data, poison=poison)
    assert_bitwise_equal(_state(optimizer, params), before)
    assert optimizer.step_count == 2  # the skipped step counts (its noise is not drawn again)
    _two_call_step(optimizer, params, data)
    assert all(torch.isfinite(t).all() for t in _state(optimizer, params))


@pytest.mark.parametrize("failing_pass", [1, 2])
def test_an_error_in_the_closure_leaves_weights_and_state_as_they_were(backend, failing_pass):
    data = _data()
    params = _params(torch.float32)
    optimizer = BayesianSAM(params, seed=SEED, backend=backend, **OPTIONS)
    _two_call_step(optimizer, params, data)
    before = _state(optimizer, params)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_pass:
            raise KeyError("data loader failed")
        optimizer.zero_grad()
        loss = loss_of(params, data)
        loss.backward()
        return loss

    with pytest.raises(KeyError):
        optimizer.step(closure)
    assert_bitwise_equal(_state(optimizer, params), before)
    assert optimizer.step_count == 1
    optimizer.state_dict()  # not inside a step any more


def test_calls_out_of_order_are_refused():
    params = _params(torch.float32)
    optimizer = BayesianSAM(params, num_data=10)
    with pytest.raises(RuntimeError, match="call sample_noise"):
        optimizer.first_step()
    with pytest.raises(RuntimeError, match="call first_step"):
        optimizer.second_step()
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()
    optimizer.sample_noise()
    with pytest.raises(RuntimeError, match="state_dict"):
        optimizer.state_dict()
    with pytest.raises(RuntimeError, match="a step is under way"):
        optimizer.sample_noise()


@pytest.mark.parametrize("options,message", [
    ({"num_data": 0}, "num_data: must be a positive"),
    ({"num_data": float("inf")}, "num_data: must be a positive"),
    ({"lr": -1.0}, "lr: must be a non-negative"),
    ({"betas": (1.0, 0.9)}, "betas: expected two numbers in"),
    ({"betas": (0.9,)}, "betas: expected two numbers in"),
    ({"rho": -0.1}, "rho: must be a non-negative"),
    ({"weight_decay": float("nan")}, "weight_decay: must be a non-negative"),
    ({"damping": -1}, "damping: must be a non-negative"),
    ({"init_precision": 0.0}, "init_precision: must be a positive"),
    ({"seed": -1}, "seed: must be an int"),
    ({"seed": 1.5}, "seed: must be an int"),
    ({"backend": "cuda"}, "unknown backend"),
])
def test_bad_options_are_refused_with_their_name(options, message):
    with pytest.raises(ValueError, match=message):
        BayesianSAM(_params(torch.float32), **{"num_data": 10, **options})


def test_bad_param_group_options_name_the_group():
    params = _params(torch.float32)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['rho'\]"):
        BayesianSAM([{"params": params[:1]}, {"params": params[1:], "rho": -1.0}], num_data=10)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: dtype"):
        BayesianSAM([torch.zeros(3, dtype=torch.int32)], num_data=10)
    with pytest.raises(ValueError, match="shares memory"):
        BayesianSAM([params[0], params[0].detach()[0]], num_data=10)


def test_bad_state_dicts_are_refused_before_anything_changes():
    params = _params(torch.float32)
    optimizer = BayesianSAM(params, num_data=10, seed=5)
    saved = optimizer.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['bsam'\]\['step'\]"):
        optimizer.load_state_dict({**saved, "bsam": {"seed": 1, "step": -2}})
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        optimizer.load_state_dict({**saved, "param_groups": [{**saved["param_groups"][0], "lr": -1.0}]})
    assert optimizer.seed == 5 and optimizer.param_groups[0]["lr"] == 0.5


def test_a_non_finite_first_gradient_leaves_the_second_pass_at_the_mean(backend):
    """An inf in the first gradient (an fp16 overflow, say): no ascent, so the second forward runs at the
    mean w (finite), BatchNorm's statistics stay finite, and the skipped step restores w bit for bit;
    ``step(closure)`` freezes BatchNorm's statistics at the ascent point."""
    require(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    optimizer = BayesianSAM(model.parameters(), num_data=1000, backend=backend)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.sample_noise()
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[0, 0] = float("inf")
    optimizer.first_step(zero_grad=True)
    assert_bitwise_equal(list(model.parameters()), before, "no ascent: the weights are the mean")
    ((model(x) - y) ** 2).mean().backward()
    optimizer.second_step(zero_grad=True)
    assert_bitwise_equal(list(model.parameters()), before, "the skipped step restores w")
    assert torch.isfinite(model[1].running_mean).all() and torch.isfinite(model[1].running_var).all()

    def closure():
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    statistics = model[1].running_mean.clone()
    calls = []
    model[1].register_forward_hook(lambda module, args, out: calls.append(module.running_mean.clone()))
    optimizer.step(closure)
    assert not torch.equal(calls[0], statistics)  # the pass at the sample updated them ...
    assert torch.equal(model[1].running_mean, calls[0])  # ... the pass at the ascent point did not
