"""The cheap SAM variants (step schedules, LookSAM, MomentumSAM) against the eager implementations of
eager_reference.py over several steps of a small model: both loop styles, SGD and AdamW (MomentumSAM over
SGD, Adam and AdamW, fused and generic), checkpoint resume in the middle of a schedule, GradScaler, and
bad values."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from cases import on_backends, pairwise_over_backends
from eager_reference import (
    AESAMRule,
    EagerAdamMSAM,
    EagerLookSAM,
    EagerMSAM,
    ScheduledSAM,
    batch_loss,
    closure_step,
    documented_uniform,
    make_batches,
    make_mlp,
    run,
)
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels.optim import (
    AESAM,
    ESAM,
    SAM,
    Interval,
    LatePhase,
    LookSAM,
    MomentumSAM,
    Randomized,
)
from sam_kernels.optim.schedules import uniform

STEPS = 7
SEED = 1234
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
}

#: name: (package schedule factory, reference decision factory)
SCHEDULES = {
    "interval": (lambda: Interval(3), lambda: (lambda t, s: t % 3 == 0)),
    "randomized": (lambda: Randomized(0.5), lambda: (lambda t, s: documented_uniform(SEED, t) < 0.5)),
    "randomized_fn": (lambda: Randomized(lambda t: 0.2 + 0.1 * t),
                      lambda: (lambda t, s: documented_uniform(SEED, t) < 0.2 + 0.1 * t)),
    "late_phase": (lambda: LatePhase(0.5, total_steps=STEPS), lambda: (lambda t, s: t >= 4)),
    "aesam": (lambda: AESAM(STEPS), lambda: AESAMRule(STEPS)),
}


def closure_loop(optimizer, model, batches, passes: list | None = None) -> None:
    for x, y in batches:
        closure_step(optimizer, model, x, y, passes)


def two_call_loop(optimizer, model, batches, passes: list | None = None) -> None:
    for x, y in batches:
        batch_loss(model, x, y).backward()
        if passes is not None:
            passes.append(1)
        optimizer.first_step(zero_grad=True)
        if optimizer.needs_second_pass():
            batch_loss(model, x, y).backward()
            if passes is not None:
                passes.append(1)
        optimizer.second_step(zero_grad=True)


LOOPS = {"closure": closure_loop, "two_call": two_call_loop}


def reference_run(base_name: str, decide) -> tuple[torch.nn.Module, ScheduledSAM]:
    model = make_mlp()
    cls, options = BASES[base_name]
    ref = ScheduledSAM(model, cls(model.parameters(), **options), 0.05, decide)
    run(ref, model, make_batches(STEPS))
    return model, ref


def test_the_draw_is_the_documented_one():
    for seed, step in [(0, 0), (SEED, 3), (2**64 - 1, 2**40 + 5), (7, 2**62)]:
        assert uniform(seed, step) == documented_uniform(seed, step)
    draws = [uniform(SEED, t) < 0.3 for t in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03


@pairwise_over_backends(schedule=list(SCHEDULES), base_name=list(BASES), loop=list(LOOPS))
def test_schedules_match_reference(backend, schedule, base_name, loop):
    make_schedule, make_rule = SCHEDULES[schedule]
    expected, ref = reference_run(base_name, make_rule())
    assert (any(ref.sam_steps) and not all(ref.sam_steps)) or schedule == "aesam", ref.sam_steps
    model = make_mlp()
    cls, options = BASES[base_name]
    sam = SAM(model.parameters(), cls, rho=0.05, seed=SEED, schedule=make_schedule(), backend=backend,
              **options)
    passes: list = []
    LOOPS[loop](sam, model, make_batches(STEPS), passes)
    assert len(passes) == STEPS + sum(ref.sam_steps)
    assert_close(list(model.parameters()), list(expected.parameters()), scale=20)


def test_aesam_mixes_sam_and_plain_steps():
    """Over a longer run the rule picks both kinds (so the comparison above is not all-SAM by chance)."""
    steps = 40
    batches = make_batches(steps)
    model = make_mlp()
    rule = AESAMRule(steps)
    ref = ScheduledSAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 0.05, rule)
    run(ref, model, batches)
    assert 0 < sum(ref.sam_steps) < steps, ref.sam_steps
    sam_model = make_mlp()
    sam = SAM(sam_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=AESAM(steps),
              backend="torch")
    passes: list = []
    closure_loop(sam, sam_model, batches, passes)
    assert len(passes) == steps + sum(ref.sam_steps)
    assert_close(list(sam_model.parameters()), list(model.parameters()), scale=50)


def assert_resumes_exactly(build, unperturbed=lambda optimizer: contextlib.nullcontext(),
                           after_load=None) -> None:
    """Save after 4 of STEPS steps, load into a fresh model and optimizer, finish: the weights equal the
    uninterrupted run's bit for bit."""
    batches = make_batches(STEPS)
    straight = make_mlp()
    closure_loop(build(straight), straight, batches)
    first = make_mlp()
    optimizer = build(first)
    closure_loop(optimizer, first, batches[:4])
    with unperturbed(optimizer):
        checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = make_mlp(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    again = build(resumed)
    again.load_state_dict(checkpoint["optimizer"])
    if after_load is not None:
        after_load(again)
    closure_loop(again, resumed, batches[4:])
    assert_bitwise_equal(list(resumed.parameters()), list(straight.parameters()))


# On Triton: AESAM's decision reads the kernels' norm; the host schedules' resume is backend-free.
@on_backends("schedule", ["interval", "randomized", "aesam"], triton=["aesam"])
def test_schedule_resumes_exactly(backend, schedule):
    make_schedule, _ = SCHEDULES[schedule]
    assert_resumes_exactly(lambda model: SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1,
                                             momentum=0.9, seed=SEED, schedule=make_schedule(),
                                             backend=backend))


def test_plain_step_keeps_gradients_when_the_second_backward_is_skipped():
    """first_step(zero_grad=True) on a plain step puts the gradients aside; second_step brings them back
    when no second backward ran, and takes the new ones when it did (same batch: the same step)."""
    batches = make_batches(2)
    results = []
    for run_second in (False, True):
        model = make_mlp()
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, schedule=Interval(2), backend="torch")
        for x, y in batches:
            batch_loss(model, x, y).backward()
            sam.first_step(zero_grad=True)
            if sam.needs_second_pass() or run_second:
                assert all(p.grad is None for p in model.parameters())
                batch_loss(model, x, y).backward()
            sam.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in model.parameters()])
    assert_bitwise_equal(results[0], results[1])


def test_plain_step_under_grad_scaler():
    """A plain step under GradScaler: one scaled backward, scaler.step unscales, the weights match the
    unscaled run (the scale is a power of two)."""
    batches = make_batches(4)
    results = []
    for enabled in (False, True):
        model = make_mlp()
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=Interval(2),
                  backend="torch")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=enabled)
        for x, y in batches:
            scaler.scale(batch_loss(model, x, y)).backward()
            sam.first_step(zero_grad=True, grad_scaler=scaler)
            if sam.needs_second_pass():
                scaler.scale(batch_loss(model, x, y)).backward()
            scaler.step(sam)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    assert_close(results[1], results[0])


def test_esam_with_a_host_schedule_drops_nothing_on_plain_steps():
    model = make_mlp()
    esam = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, beta=0.5, gamma=1.0, schedule=Interval(2),
                backend="torch", seed=3)
    drops = []
    for x, y in make_batches(8):
        drops.append(len(esam.dropped_tensors))
        closure_loop(esam, model, [(x, y)])
    assert drops[1::2] == [0, 0, 0, 0] and sum(drops[0::2]) > 0, drops


def test_esam_refuses_aesam():
    with pytest.raises(ValueError, match="schedule: AESAM decides after the first backward"):
        ESAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, schedule=AESAM(10))


# ---------------------------------------------------------------------------------------- LookSAM


@pairwise_over_backends(base_name=list(BASES), loop=list(LOOPS))
def test_looksam_matches_reference(backend, base_name, loop):
    cls, options = BASES[base_name]
    expected = make_mlp()
    ref = EagerLookSAM(expected, cls(expected.parameters(), **options), rho=0.05, k=3, alpha=0.7)
    run(ref, expected, make_batches(STEPS))
    model = make_mlp()
    looksam = LookSAM(model.parameters(), cls, rho=0.05, k=3, alpha=0.7, backend=backend, **options)
    passes: list = []
    LOOPS[loop](looksam, model, make_batches(STEPS), passes)
    assert len(passes) == STEPS + len(range(0, STEPS, 3))
    assert_close(list(model.parameters()), list(expected.parameters()), scale=50)
    reference_gv = [v.float() for v in ref.gv]
    assert_close([looksam.state[p]["looksam_gv"] for p in model.parameters()], reference_gv, scale=100)


def test_looksam_reuse_is_not_sgd():
    """The plain steps really add the g_v term (alpha 0.7 against alpha 0: different weights)."""
    finals = []
    for alpha in (0.0, 0.7):
        model = make_mlp()
        closure_loop(LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, k=3, alpha=alpha,
                             backend="torch"), model, make_batches(3))
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (finals[0] - finals[1]).abs().max() > 1e-4


def test_looksam_resumes_exactly(backend):
    assert_resumes_exactly(lambda model: LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=3, lr=0.1,
                                                 momentum=0.9, backend=backend))


def test_looksam_skipped_refresh_keeps_gv():
    """A non-finite gradient on a refresh step skips the step and keeps the previous g_v and its norm."""
    model = make_mlp()
    looksam = LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, k=2, backend="torch")
    closure_loop(looksam, model, make_batches(2))
    gv = [looksam.state[p]["looksam_gv"].clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1)[0]
    batch_loss(model, x, y).backward()
    looksam.first_step(zero_grad=True)
    assert looksam.needs_second_pass()
    batch_loss(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = math.nan
    looksam.second_step(zero_grad=True)
    assert_bitwise_equal(list(model.parameters()), weights)
    assert_bitwise_equal([looksam.state[p]["looksam_gv"] for p in model.parameters()], gv)


# ------------------------------------------------------------------------------------ MomentumSAM


@on_backends("style", ["closure", "plain"], triton=["closure"])  # the styles differ on the host only
def test_msam_matches_reference(backend, style):
    expected = make_mlp()
    ref = EagerMSAM(expected, lr=0.1, momentum=0.9, rho=0.3, weight_decay=1e-2)
    run(ref, expected, make_batches(STEPS))
    model = make_mlp()
    msam = MomentumSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.3, weight_decay=1e-2,
                       backend=backend)
    passes: list = []
    if style == "closure":
        closure_loop(msam, model, make_batches(STEPS), passes)
    else:
        for x, y in make_batches(STEPS):
            msam.zero_grad()
            batch_loss(model, x, y).backward()
            passes.append(1)
            msam.step()
    assert len(passes) == STEPS
    assert_close(list(model.parameters()), list(expected.parameters()), scale=20)
    with msam.unperturbed():
        assert_close(list(model.parameters()), ref.unperturbed(), scale=20)
    assert_close(list(model.parameters()), list(expected.parameters()), scale=20)


def test_msam_unperturbed_round_trip_is_exact():
    model = make_mlp()
    msam = MomentumSAM(model.parameters(), lr=0.1, rho=0.3, backend="torch")
    closure_loop(msam, model, make_batches(3))
    perturbed = [p.detach().clone() for p in model.parameters()]
    with msam.unperturbed():
        plain = [p.detach().clone() for p in model.parameters()]
    assert_bitwise_equal(list(model.parameters()), perturbed)
    assert any(not torch.equal(a, b) for a, b in zip(plain, perturbed, strict=True))


def test_msam_resumes_exactly(backend):
    assert_resumes_exactly(lambda model: MomentumSAM(model.parameters(), lr=0.1, rho=0.3, weight_decay=1e-2,
                                                     backend=backend),
                           unperturbed=lambda optimizer: optimizer.unperturbed(),
                           after_load=lambda optimizer: optimizer.perturb())


def test_msam_skips_a_non_finite_step_bit_for_bit():
    model = make_mlp()
    msam = MomentumSAM(model.parameters(), lr=0.1, rho=0.3, backend="torch")
    closure_loop(msam, model, make_batches(2))
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [msam.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = make_batches(1)[0]
    msam.zero_grad()
    batch_loss(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    msam.step()
    assert_bitwise_equal(list(model.parameters()), weights)
    assert_bitwise_equal([msam.state[p]["momentum_buffer"] for p in model.parameters()], momentum)


# ------------------------------------------------------------------------- MomentumSAM over Adam/AdamW

#: name: (base class, its options); Adam's weight decay is L2 (folded into m), AdamW's decoupled.
ADAM_BASES = {
    "adam": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-2}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}),
    "adamw_amsgrad": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True}),
}
#: name: (SAM's path options, whether the fused restore-and-step runs)
MSAM_PATHS = {"fused": ({}, True), "generic": ({"fused": False}, False)}


def adam_msam(model, base: str, path: str, backend: str, rho: float = 0.3) -> MomentumSAM:
    cls, options = ADAM_BASES[base]
    path_options, fused = MSAM_PATHS[path]
    msam = MomentumSAM(model.parameters(), rho=rho, base_optimizer=cls, backend=backend, **options,
                       **path_options)
    assert msam.uses_fused_step == fused
    return msam


def adam_state(msam: MomentumSAM, model) -> list[torch.Tensor]:
    keys = ("exp_avg", "exp_avg_sq", "step")
    return [msam.state[p][key].clone() for p in model.parameters() for key in keys]


@pairwise_over_backends(base=list(ADAM_BASES), path=list(MSAM_PATHS))
def test_msam_adam_matches_reference(backend, base, path):
    expected = make_mlp()
    cls, options = ADAM_BASES[base]
    ref = EagerAdamMSAM(expected, cls, rho=0.3, **options)
    run(ref, expected, make_batches(STEPS))
    model = make_mlp()
    msam = adam_msam(model, base, path, backend)
    passes: list = []
    closure_loop(msam, model, make_batches(STEPS), passes)
    assert len(passes) == STEPS
    assert_close(list(model.parameters()), list(expected.parameters()), scale=20)
    with msam.unperturbed():
        assert_close(list(model.parameters()), ref.unperturbed(), scale=20)
    assert_close([msam.state[p]["exp_avg"] for p in model.parameters()],
                 [ref.base.state[p]["exp_avg"] for p in expected.parameters()], scale=20)


@pytest.mark.parametrize("path", list(MSAM_PATHS))
def test_msam_adam_perturbs_along_the_raw_first_moment(path):
    """One step over two param groups: w~ - w is exactly -rho_i * m / ||m|| in group i, with torch's own
    (not bias-corrected) m and ||m|| the global norm over both groups."""
    model = make_mlp()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    msam = MomentumSAM([{"params": first, "rho": 0.7}, {"params": second}], rho=0.2,
                       base_optimizer=torch.optim.AdamW, lr=0.01, backend="torch", **MSAM_PATHS[path][0])
    closure_loop(msam, model, make_batches(1))
    perturbed = [p.detach().clone() for p in model.parameters()]
    with msam.unperturbed():
        plain = [p.detach().clone() for p in model.parameters()]
    moments = [msam.state[p]["exp_avg"] for p in model.parameters()]
    norm = math.sqrt(sum(float(m.double().square().sum()) for m in moments))
    rhos = [0.7] * len(first) + [0.2] * len(second)
    assert_close([a - b for a, b in zip(perturbed, plain, strict=True)],
                 [-rho * m / norm for rho, m in zip(rhos, moments, strict=True)], scale=20)


@on_backends("path", list(MSAM_PATHS), triton=["fused"])
def test_msam_adam_resumes_exactly(backend, path):
    assert_resumes_exactly(lambda model: adam_msam(model, "adamw", path, backend),
                           unperturbed=lambda optimizer: optimizer.unperturbed(),
                           after_load=lambda optimizer: optimizer.perturb())


@pytest.mark.parametrize("path", list(MSAM_PATHS))
def test_msam_adam_unperturbed_round_trip_is_exact(path):
    model = make_mlp()
    msam = adam_msam(model, "adam", path, "torch")
    closure_loop(msam, model, make_batches(3))
    perturbed = [p.detach().clone() for p in model.parameters()]
    with msam.unperturbed():
        plain = [p.detach().clone() for p in model.parameters()]
        msam.unperturb()  # a no-op inside
        assert_bitwise_equal(list(model.parameters()), plain)
    assert_bitwise_equal(list(model.parameters()), perturbed)
    assert any(not torch.equal(a, b) for a, b in zip(plain, perturbed, strict=True))
    msam.unperturb()
    assert_bitwise_equal(list(model.parameters()), plain)
    msam.perturb()
    assert_bitwise_equal(list(model.parameters()), perturbed)


@on_backends("path", list(MSAM_PATHS), triton=["fused"])
def test_msam_adam_skips_a_non_finite_step_bit_for_bit(backend, path):
    model = make_mlp()
    msam = adam_msam(model, "adamw", path, backend)
    closure_loop(msam, model, make_batches(2))
    weights = [p.detach().clone() for p in model.parameters()]
    state = adam_state(msam, model)
    with msam.unperturbed():
        plain = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1)[0]
    msam.zero_grad()
    batch_loss(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = math.nan
    msam.step()
    assert_bitwise_equal(list(model.parameters()), weights)
    assert_bitwise_equal(adam_state(msam, model), state)
    with msam.unperturbed():
        assert_bitwise_equal(list(model.parameters()), plain)


@pytest.mark.parametrize("path", list(MSAM_PATHS))
def test_msam_adam_non_finite_first_step_leaves_w(path):
    """A skipped first step: no first moment yet (or a zero one), so the weights stay w bit for bit."""
    model = make_mlp()
    initial = [p.detach().clone() for p in model.parameters()]
    msam = adam_msam(model, "adamw", path, "torch")
    x, y = make_batches(1)[0]
    batch_loss(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    msam.step()
    assert_bitwise_equal(list(model.parameters()), initial)


def test_msam_adam_refuses_grad_scaler():
    model = make_mlp()
    msam = adam_msam(model, "adamw", "fused", "torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batches(1)[0]
    scaler.scale(batch_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match=r"MomentumSAM: torch\.amp\.GradScaler is not supported"):
        scaler.step(msam)


def test_msam_learning_rate_defaults():
    assert MomentumSAM(make_mlp().parameters()).param_groups[0]["lr"] == 0.1
    assert MomentumSAM(make_mlp().parameters()).param_groups[0]["momentum"] == 0.9
    adamw = MomentumSAM(make_mlp().parameters(), base_optimizer=torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == 1e-3 and isinstance(adamw.base_optimizer, torch.optim.AdamW)


# ------------------------------------------------------------------------------------- bad values

BAD = [
    (lambda: Interval(0), "k: must be an int >= 1"),
    (lambda: Interval(2.5), "k: must be an int >= 1"),
    (lambda: Randomized(1.5), r"p: must be a probability in \[0, 1\]"),
    (lambda: Randomized(-0.1), r"p: must be a probability"),
    (lambda: LatePhase(-1), "start: must be an int >= 0"),
    (lambda: LatePhase(0.5), "total_steps: required"),
    (lambda: LatePhase(1.5, total_steps=10), "start: a fraction must be in"),
    (lambda: AESAM(0), "total_steps: must be an int >= 1"),
    (lambda: AESAM(10, decay=1.0), "decay: must be in"),
    (lambda: AESAM(10, lambda_1=math.inf), "lambda_1: must be a finite number"),
    (lambda: AESAM(10, lambda_2=math.nan), "lambda_2: must be a finite number"),
    (lambda: LookSAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, k=0), "k: must be an int >= 1"),
    (lambda: LookSAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, alpha=-0.5), "alpha"),
    (lambda: MomentumSAM(make_mlp().parameters(), lr=0.1, momentum=0.0), "momentum: MomentumSAM"),
    (lambda: MomentumSAM(make_mlp().parameters(), base_optimizer=torch.optim.AdamW, momentum=0.9),
     "momentum: not an option of MomentumSAM over AdamW"),
    (lambda: MomentumSAM(make_mlp().parameters(), base_optimizer=torch.optim.Adam, betas=(0.0, 0.999)),
     r"betas: MomentumSAM perturbs along Adam's first moment, so betas\[0\] must be in \(0, 1\)"),
    (lambda: MomentumSAM(make_mlp().parameters(), base_optimizer=torch.optim.Adam, betas=0.9),
     r"betas: expected \(beta1, beta2\)"),
    (lambda: MomentumSAM(make_mlp().parameters(), lr=0.1, betas=(0.9, 0.999)), "betas: an option of Adam"),
    (lambda: MomentumSAM(make_mlp().parameters(), base_optimizer=torch.optim.RMSprop),
     "base_optimizer: MomentumSAM's base optimizer is torch.optim.SGD, Adam or AdamW"),
    (lambda: MomentumSAM(make_mlp().parameters(),
                         base_optimizer=torch.optim.AdamW(make_mlp().parameters())),
     "base_optimizer: MomentumSAM builds its base optimizer itself"),
    (lambda: MomentumSAM(make_mlp().parameters(), base_optimizer=torch.optim.AdamW, rho=-1.0), "rho"),
    (lambda: SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, schedule="every 5"), "schedule:"),
    (lambda: SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, schedule=Interval(2),
                 capturable=True), "capturable=True: a schedule"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_values_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_randomized_bad_probability_function_is_named():
    model = make_mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, schedule=Randomized(lambda t: 2.0),
              backend="torch")
    with pytest.raises(ValueError, match="p: must be a probability"):
        closure_loop(sam, model, make_batches(1))
    assert sam._run.ascent is None


def test_needs_second_pass_outside_a_step():
    sam = SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs_second_pass\\(\\): call it after first_step"):
        sam.needs_second_pass()


def test_msam_refuses_the_two_call_style():
    msam = MomentumSAM(make_mlp().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="one pass per step"):
        msam.first_step()


def test_per_worker_ascent_context_only_on_sam_steps():
    """A plain step descends with its first gradient, so under DDP that backward must be the synced one:
    ``ascent_context`` (``model.no_sync``) wraps the first pass of SAM steps only, and
    ``per_worker_ascent(model, optimizer)`` does the same for the two-call loop."""
    from sam_kernels.distributed import per_worker_ascent

    model = make_mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, schedule=Interval(3), backend="torch")
    entered = []

    class Model(torch.nn.Module):  # stands in for a DDP model: records its no_sync calls
        def no_sync(self):
            entered.append(sam.state_dict()["sam"]["step"])
            return contextlib.nullcontext()

    sam.ascent_context = Model().no_sync
    closure_loop(sam, model, make_batches(6))
    assert entered == [0, 3]
    entered.clear()
    sam.ascent_context = None
    for step in range(6, 9):
        with per_worker_ascent(Model(), sam):
            pass
        assert sam.planned_sam_step() == (step % 3 == 0)
        closure_loop(sam, model, make_batches(1))
    assert entered == [6]


def test_aesam_refuses_a_per_worker_ascent():
    from sam_kernels.distributed import per_worker_ascent

    model = make_mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, schedule=AESAM(10), backend="torch")
    sam.ascent_context = contextlib.nullcontext
    with pytest.raises(ValueError, match="ascent_context: AESAM decides after the first backward"):
        closure_loop(sam, model, make_batches(1))
    assert sam._run.ascent is None
    with pytest.raises(ValueError, match="per_worker_ascent"), per_worker_ascent(model, sam):
        pass
