"""SAM, ASAM, SSAM and USAM against the plain eager implementation of eager_reference.py, over several steps
of a small model with BatchNorm, on both loop styles, the fused and the generic descent."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import pairwise_over_backends
from eager_reference import (
    ReferenceSAM,
    assert_models_close,
    assert_models_equal,
    batch_loss,
    clone_model,
    closure_step,
    eager_sam_step,
    make_batches,
    make_model,
)

from sam_kernels.optim import SAM, freeze_bn_stats

STEPS = 3

BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True}),
}

#: SAM options of each variant (the eager reference reads the same dictionary).
VARIANTS = {
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5, "adaptive": True, "adaptive_eta": 0.01},
    "ssam": {"rho": 0.05, "renormalize": True},
    "usam": {"rho": 0.02, "normalize_ascent": False},
    "usam_ssam": {"rho": 0.02, "normalize_ascent": False, "renormalize": True},
    "asam_ssam": {"rho": 0.5, "adaptive": True, "renormalize": True},
}


def eager_for(model, base_cls, base_options, options) -> ReferenceSAM:
    group = {"params": list(model.parameters()), "rho": options["rho"],
             "adaptive": options.get("adaptive", False), "eta": options.get("adaptive_eta", 0.0)}
    return ReferenceSAM([group], base_cls(model.parameters(), **base_options),
                    normalize=options.get("normalize_ascent", True),
                    renormalize=options.get("renormalize", False))


def two_call_step(sam: SAM, model, x, y) -> torch.Tensor:
    """The two-call loop style, BatchNorm frozen in the second pass."""
    loss = batch_loss(model, x, y)
    loss.backward()
    sam.first_step(zero_grad=True)
    with freeze_bn_stats(model):
        batch_loss(model, x, y).backward()
    sam.second_step(zero_grad=True)
    return loss.detach()


def fit(model, optimizer, batches, scheduler=None) -> list[float]:
    """A minimal generic training loop (the shape of Lightning's automatic optimization): it knows only
    torch.optim's closure convention."""
    losses = []
    for x, y in batches:
        losses.append(closure_step(optimizer, model, x, y).item())
        if scheduler is not None:
            scheduler.step()
    return losses


def assert_states_close(actual: torch.optim.Optimizer, expected: torch.optim.Optimizer) -> None:
    actual_state, expected_state = actual.state_dict()["state"], expected.state_dict()["state"]
    assert actual_state.keys() == expected_state.keys()
    for index, entry in expected_state.items():
        assert actual_state[index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(actual_state[index][key], value, rtol=1e-5, atol=1e-6)


@pairwise_over_backends(base_name=list(BASES), variant=list(VARIANTS))
def test_fused_path_matches_eager(backend, base_name, variant):
    base_cls, base_options = BASES[base_name]
    options = VARIANTS[variant]
    model = make_model()
    reference_model = clone_model(model)
    sam = SAM(model.parameters(), base_cls, backend=backend, **options, **base_options)
    reference = eager_for(reference_model, base_cls, base_options, options)
    assert sam.uses_fused_step
    for x, y in make_batches(STEPS):
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
    assert_models_close(model, reference_model)
    assert_states_close(sam.base_optimizer, reference.base)


@pytest.mark.parametrize("variant", ["sam", "ssam"])
def test_generic_path_with_rmsprop_matches_eager(backend, variant):
    base_options = {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 1e-3}
    options = VARIANTS[variant]
    model = make_model()
    reference_model = clone_model(model)
    sam = SAM(model.parameters(), torch.optim.RMSprop, backend=backend, **options, **base_options)
    reference = eager_for(reference_model, torch.optim.RMSprop, base_options, options)
    assert not sam.uses_fused_step
    for x, y in make_batches(STEPS):
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
    assert_models_close(model, reference_model)
    assert_states_close(sam.base_optimizer, reference.base)


@pytest.mark.parametrize("flags", [{"fused": False}, {"foreach": True}, {"foreach": False}])
def test_flags_pick_the_path_and_agree(flags):
    """fused=False and foreach=True take the generic path; both paths give the eager result."""
    base_cls, base_options = BASES["sgd"]
    model = make_model()
    reference_model = clone_model(model)
    sam = SAM(model.parameters(), base_cls, backend="torch", **flags, **base_options)
    assert sam.uses_fused_step == (flags == {"foreach": False})
    reference = eager_for(reference_model, base_cls, base_options, VARIANTS["sam"])
    for x, y in make_batches(STEPS):
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
    assert_models_close(model, reference_model)
    if "foreach" in flags:
        assert all(group["foreach"] is flags["foreach"] for group in sam.param_groups)


def test_closure_path_in_a_generic_loop(backend):
    """step(closure) inside a loop written for any torch.optim optimizer equals the two-call style and
    the eager reference, returns the loss at w, and works with an LR scheduler."""
    base_cls, base_options = BASES["sgd"]
    batches = make_batches(STEPS)
    plain = make_model()
    fit(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batches)  # the same loop, plain SGD

    model, two_call_model, reference_model = make_model(), make_model(), make_model()
    sam = SAM(model.parameters(), base_cls, backend=backend, **base_options)
    two_call = SAM(two_call_model.parameters(), base_cls, backend=backend, **base_options)
    reference = eager_for(reference_model, base_cls, base_options, VARIANTS["sam"])
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
                  for opt in (sam, two_call, reference.base)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        losses = fit(model, sam, batches, schedulers[0])
        for x, y in batches:
            two_call_step(two_call, two_call_model, x, y)
            schedulers[1].step()
            expected_loss = eager_sam_step(reference, reference_model, x, y).item()
            schedulers[2].step()
            assert losses.pop(0) == pytest.approx(expected_loss, rel=1e-5)
    assert_models_equal(model, two_call_model)
    assert_models_close(model, reference_model)
    assert sam.param_groups[0]["lr"] == pytest.approx(base_options["lr"] * 0.5**STEPS)


def test_param_groups_with_their_own_rho_adaptive_and_lr(backend):
    """Per-group rho, ASAM weighting (official style: only the weight matrices) and lr."""
    model = make_model()
    reference_model = clone_model(model)

    def groups(m, eager: bool):
        matrices = [p for p in m.parameters() if p.dim() > 1]
        others = [p for p in m.parameters() if p.dim() <= 1]
        if eager:
            return [{"params": matrices, "rho": 0.3, "adaptive": True, "eta": 0.01},
                    {"params": others, "rho": 0.05, "adaptive": False, "eta": 0.0}]
        return [{"params": matrices, "rho": 0.3, "adaptive": True, "adaptive_eta": 0.01, "lr": 0.02},
                {"params": others}]

    sam = SAM(groups(model, eager=False), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
              backend=backend)
    eager_groups = groups(reference_model, eager=True)
    base = torch.optim.SGD([{"params": eager_groups[0]["params"], "lr": 0.02},
                            {"params": eager_groups[1]["params"]}], lr=0.05, momentum=0.9)
    reference = ReferenceSAM(eager_groups, base)
    for x, y in make_batches(STEPS):
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
    assert_models_close(model, reference_model)


def test_add_param_group_mid_training():
    model = make_model()
    reference_model = clone_model(model)
    params, reference_params = list(model.parameters()), list(reference_model.parameters())
    sam = SAM(params[:2], torch.optim.AdamW, lr=0.01, backend="torch")
    base = torch.optim.AdamW(reference_params[:2], lr=0.01)
    reference = ReferenceSAM([{"params": reference_params[:2], "rho": 0.05, "adaptive": False, "eta": 0.0}],
                         base)
    for step, (x, y) in enumerate(make_batches(4)):
        if step == 2:
            sam.add_param_group({"params": params[2:], "rho": 0.1, "lr": 0.02})
            base.add_param_group({"params": reference_params[2:], "lr": 0.02})
            reference.groups.append({"params": reference_params[2:], "rho": 0.1, "adaptive": False,
                                     "eta": 0.0})
        for p in params[2:] if step < 2 else []:
            p.requires_grad_(False)
        for p in reference_params[2:] if step < 2 else []:
            p.requires_grad_(False)
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
        for p in params + reference_params:
            p.requires_grad_(True)
    assert sam.param_groups[1]["sam_rho"] == 0.1 and sam.param_groups[1]["sam_adaptive"] is False
    assert sam.base_optimizer.param_groups is sam.param_groups
    assert_models_close(model, reference_model)


def test_base_optimizer_instance_equals_class_form():
    base_cls, base_options = BASES["adamw"]
    model, other = make_model(), make_model()
    by_class = SAM(model.parameters(), base_cls, backend="torch", seed=3, **base_options)
    by_instance = SAM(None, base_cls(other.parameters(), **base_options), backend="torch", seed=3)
    for x, y in make_batches(STEPS):
        two_call_step(by_class, model, x, y)
        two_call_step(by_instance, other, x, y)
    assert_models_equal(model, other)
    assert by_instance.state is by_instance.base_optimizer.state


def test_zero_grad_set_to_none_flag():
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    batch_loss(model, *make_batches(1)[0]).backward()
    sam.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    sam.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def make_conv_model(seed: int = 0) -> torch.nn.Module:
    """A tiny CNN (4-d weights, so channels_last changes their layout)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 2 * 2, 3))


def conv_batches(count: int, dtype=torch.float32, memory_format=torch.contiguous_format):
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 3, 6, 6, generator=generator).to(dtype).contiguous(memory_format=memory_format),
             torch.randint(0, 3, (6,), generator=generator)) for _ in range(count)]


@pairwise_over_backends(base_name=list(BASES), layout={
    "channels_last": (torch.float32, torch.channels_last),
    "float64": (torch.float64, torch.contiguous_format),
    "float64-channels_last": (torch.float64, torch.channels_last)})
def test_channels_last_and_float64_models_match_eager(backend, base_name, layout):
    """A channels_last or float64 model trains in the kernels (no copies: the weights, gradients,
    backups and state keep the model's layout) and follows the eager SAM over torch.optim, which computes
    in the model's dtype.

    NOTE (fp64 tolerance): the element math is fp64 (the op tests hold it to 1e-12), but the global norm,
    and so the perturbation's scale, is fp32 by design (backends/common.py, "fp64"): the second gradient
    is taken at a point 1e-8 (relative to e) away from the eager one's, which the steps carry into the
    weights at about 1e-6 relative."""
    dtype, memory_format = layout
    base_cls, base_options = BASES[base_name]
    model = make_conv_model().to(dtype=dtype, memory_format=memory_format)
    reference_model = clone_model(model)
    sam = SAM(model.parameters(), base_cls, backend=backend, rho=0.05, **base_options)
    reference = eager_for(reference_model, base_cls, base_options, {"rho": 0.05})
    assert sam.uses_fused_step
    for x, y in conv_batches(STEPS, dtype, memory_format):
        two_call_step(sam, model, x, y)
        eager_sam_step(reference, reference_model, x, y)
    tolerance = {"rtol": 1e-5, "atol": 1e-9} if dtype == torch.float64 else {}
    assert_models_close(model, reference_model, **tolerance)
    weight = model[0].weight
    assert weight.is_contiguous(memory_format=memory_format)
    for value in sam.state[weight].values():
        if value.dim() == 4:
            assert value.stride() == weight.stride()
