"""Which option combinations run: one table, consulted by the optimizers and iterated by the tests.

A combination is a variant (its policy's ``name``), a base optimizer (``"sgd"``, ``"adam"`` for Adam and
AdamW, ``"other"`` for any other torch.optim class), a path (``"auto"``: the fused descent when it can run,
``"fused"``: ``fused=True``, ``"generic"``: ``fused=False``, ``"foreach"``: ``foreach=True``), ``capturable``,
a schedule (``"none"``, ``"host"``: Interval, Randomized, LatePhase, ``"after-backward"``: AE-SAM) and AMP
(a ``torch.amp.GradScaler`` driving the steps). Every combination either runs, with the trajectory of the
eager reference (python_tests/optim/test_combinations.py iterates the table), or is refused with the
message of the first ``REFUSALS`` row that matches it.

What the table cannot see is checked where it is known: a base optimizer's options (a tensor ``lr``,
``differentiable``) and FSDP2 parameters when the fused descent is planned (``fused_steps``), the calling
styles (``step(closure)`` under a GradScaler, ESAM's data selection outside ``sds_step``) at the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .fused_steps import class_kind

#: The variants whose state follows every SAM step (EMA buffers, the first gradient's copy) and which
#: neither take a schedule nor replay in a captured graph.
FAMILY = ("GSAM", "WSAM", "FriendlySAM", "VaSSO", "FisherSAM", "GCSAM", "SparseSAM")
VARIANTS = ("SAM", "ASAM", "USAM", "SSAM", "ESAM", "LookSAM", "MomentumSAM", "MultiStepSAM", *FAMILY)
BASES = ("sgd", "adam", "other")
PATHS = ("auto", "fused", "generic", "foreach", "fused+foreach")
SCHEDULES = ("none", "host", "after-backward")


@dataclass(frozen=True)
class Combination:
    """One point of the option space (see the module docstring)."""

    variant: str
    base: str
    path: str
    capturable: bool
    schedule: str
    amp: bool
    #: The base optimizer's class name and the schedule's, for the messages.
    base_name: str = ""
    schedule_name: str = ""
    #: ESAM's per-tensor SWP drops tensors (``swp="tensor"`` and ``beta < 1``).
    drops_tensors: bool = False
    #: Micro-batches each take their own ascent (``SAM.accumulate``, m-sharpness); whether the policy
    #: allows it (``Policy.accumulates``, SSAM's renormalization not).
    accumulate: bool = False
    accumulates: bool = True


@dataclass(frozen=True)
class Refusal:
    """A row of the table: the combinations ``matches`` and the error raised for them."""

    matches: Callable[[Combination], bool]
    error: type[Exception]
    message: str

    def raise_for(self, combination: Combination) -> None:
        raise self.error(self.message_for(combination))

    def message_for(self, combination: Combination) -> str:
        return self.message.format(base=combination.base_name, schedule=combination.schedule_name,
                                   variant=combination.variant)


_NO_FUSED_STEP = ("base_optimizer: {base} has no fused restore-and-step (torch.optim.SGD, Adam and AdamW "
                  "have)")

#: The refused combinations, most specific first (the first matching row gives the message); the rows
#: seen when the optimizer is built come before those seen at a step.
REFUSALS = (
    Refusal(lambda c: c.variant == "MomentumSAM" and c.base == "other", TypeError,
            "base_optimizer: MomentumSAM's base optimizer is torch.optim.SGD, Adam or AdamW (it perturbs "
            "along their momentum buffer or first moment)"),
    Refusal(lambda c: c.variant == "MomentumSAM" and c.schedule != "none", ValueError,
            "schedule: not an option of MomentumSAM"),
    Refusal(lambda c: c.variant == "MomentumSAM" and c.capturable, ValueError,
            "capturable: not an option of MomentumSAM"),
    Refusal(lambda c: c.variant == "LookSAM" and c.schedule != "none", ValueError,
            "schedule: LookSAM takes a SAM step every k steps; pass k instead"),
    Refusal(lambda c: c.variant == "LookSAM" and c.capturable, ValueError,
            "capturable=True: LookSAM decides on the host which steps are SAM steps"),
    Refusal(lambda c: c.variant == "MultiStepSAM" and c.schedule != "none", ValueError,
            "schedule: not an option of MultiStepSAM (its extra passes are its point; use SAM with a "
            "schedule for cheaper steps)"),
    Refusal(lambda c: c.variant in FAMILY and c.schedule != "none", ValueError,
            "schedule: not an option of {variant}, whose state follows every SAM step"),
    Refusal(lambda c: c.variant in FAMILY and c.capturable, ValueError,
            "capturable=True: {variant} keeps per-step buffers on the host side of the step, which a "
            "captured graph cannot replay"),
    Refusal(lambda c: c.variant == "ESAM" and c.capturable and c.drops_tensors, ValueError,
            "capturable=True: per-tensor SWP switches requires_grad on the host every step, which a "
            "captured graph cannot replay; use swp='element' or beta=1"),
    Refusal(lambda c: c.variant == "ESAM" and c.schedule == "after-backward", ValueError,
            "schedule: {schedule} decides after the first backward, which SWP has already pruned (a "
            "plain step would lack the dropped tensors' gradients); use a host schedule (Interval, "
            "Randomized, LatePhase) with ESAM"),
    Refusal(lambda c: c.capturable and c.schedule != "none", ValueError,
            "capturable=True: a schedule decides on the host at every step whether the second pass "
            "runs, which a captured graph cannot replay; use schedule=None"),
    Refusal(lambda c: c.capturable and c.path in ("generic", "foreach", "fused+foreach"), ValueError,
            "capturable=True: needs the fused descent (the generic one reads the non-finite flag on the "
            "host); leave fused and foreach unset"),
    Refusal(lambda c: c.path == "fused+foreach", ValueError,
            "fused and foreach: cannot both be True (fused=True is the fully fused restore-and-step, "
            "foreach=True the base optimizer's own step)"),
    Refusal(lambda c: c.path == "fused" and c.base == "other", ValueError,
            "fused=True: " + _NO_FUSED_STEP + "; use fused=None (the generic path when the fused one "
            "cannot run) or fused=False"),
    Refusal(lambda c: c.capturable and c.base == "other", ValueError, "capturable=True: " + _NO_FUSED_STEP),
    # Micro-batches show at ``accumulate()``.
    Refusal(lambda c: c.accumulate and not c.accumulates, ValueError,
            "accumulate(): {variant} with these options keeps state that follows a whole step's gradients "
            "(or renormalizes the descent by the step's ascent norm); micro-batches each with their own "
            "ascent run with SAM, ASAM, USAM, Fisher-SAM, GC-SAM and MultiStepSAM"),
    Refusal(lambda c: c.accumulate and c.schedule == "after-backward", ValueError,
            "accumulate(): {schedule} decides from each first gradient's norm, which differs between the "
            "micro-batches of one step; use a host schedule (Interval, Randomized, LatePhase)"),
    # AMP shows at the first step (a GradScaler driving it), after everything above was checked.
    Refusal(lambda c: c.variant == "MomentumSAM" and c.amp, RuntimeError,
            "MomentumSAM: torch.amp.GradScaler is not supported; use bf16 autocast"),
)


def refusal(combination: Combination) -> Refusal | None:
    """The first row of the table that refuses ``combination``, or None when it runs."""
    for row in REFUSALS:
        if row.matches(combination):
            return row
    return None


def check(combination: Combination) -> None:
    """Raise the table's error for a refused combination."""
    row = refusal(combination)
    if row is not None:
        row.raise_for(combination)


def path_of(fused: bool | None, foreach: bool | None) -> str:
    """The path the ``fused`` and ``foreach`` options ask for."""
    if fused and foreach:
        return "fused+foreach"
    if foreach:
        return "foreach"
    return {None: "auto", True: "fused", False: "generic"}[fused]


def base_of(base_class: type) -> str:
    """The table's name for a base optimizer class."""
    return class_kind(base_class) or "other"


def schedule_of(schedule) -> str:
    """The table's name for a schedule (None, a host schedule, or one that reads the first gradient)."""
    if schedule is None:
        return "none"
    return "after-backward" if schedule.needs_grad_norm else "host"


def combination_of(policy, base_optimizer, fused: bool | None, foreach: bool | None, capturable: bool,
                   amp: bool = False, accumulate: bool = False) -> Combination:
    """The combination an optimizer is built with (``base_optimizer``: a class or an instance)."""
    base_class = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
    schedule = policy.schedule
    return Combination(policy.name, base_of(base_class), path_of(fused, foreach), capturable,
                       schedule_of(schedule), amp,
                       base_name=base_class.__name__, schedule_name=type(schedule).__name__,
                       drops_tensors=bool(getattr(policy, "drops_tensors", False)), accumulate=accumulate,
                       accumulates=bool(policy.accumulates) and not getattr(policy, "renormalize", False))
