"""The variant interface: a ``Policy`` says what one SAM-family variant decides; the engine (``sam.SAM``)
runs everything else.

One SAM iteration is the same skeleton for every variant. The engine collects the gradients, asks the
policy at each decision point and runs the fused ops with the answers:

    first_step   planned_sam_step / is_sam_step   is this a SAM step?  (schedules; a plain step stops here)
                 excluded                          tensors that sit out the ascent (ESAM's SWP)
                 ascent_weighting, ascent_mask     the ascent direction and its weighting (ASAM, USAM, ESAM)
                 perturb_config                    (all of it as the perturb op's config)
                 after_ascent                      anything to keep from the first gradient (LookSAM)
    second_step  descent                           the descent gradient's multiplier, or gradients edited
                                                   in place (SSAM, LookSAM)
                 after_step                        after the base step (MomentumSAM's next perturbation)
    state_dict   state_dict / checked_variant_state / load_variant_state   its own state

A policy sees a step through a ``StepContext`` (the step plan's tensor lists, device scalars, the global
norm), never the engine's attributes. What it computes over whole tensor lists (a global inner product, a
ratio of norms) becomes a device scalar handed to the fused ops (``grad_multiplier``, the perturbation's
``scale_factor``), so a two-pass variant needs no kernel of its own. This base class is plain SAM with its
options: ASAM's weighting per param group (``sam_adaptive``), USAM (``normalize=False``), SSAM
(``renormalize``) and a ``schedule``. Which combinations of a policy with base optimizers, paths, AMP,
CUDA graphs and schedules run is declared in ``combinations.py``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.common import PerturbConfig
from .checks import check_bool
from .gradients import as_list
from .schedules import Schedule, check_schedule


@dataclass(eq=False)
class StepContext:
    """What a policy sees of one step (built by the engine for each call)."""

    #: The step plan: ``params`` (those with a gradient, in global order), ``local`` (their local
    #: shards), ``groups`` (per param group: ``group``, ``start``, ``stop``, ``positions``), ``backend``,
    #: ``device``.
    plan: Any
    #: The current local gradients of ``plan.params`` as the engine collected them (``grads``).
    collected: Any
    #: The optimizer state (the base optimizer's, shared), per parameter, and the param groups (every
    #: parameter, with or without a gradient, and the group options).
    state: MutableMapping
    param_groups: list
    #: The optimizer's seed, ``sam_eps`` (of the ascent scale and of ratios of norms) and ``backend``
    #: option (for calls into ``sam_kernels.ops``).
    seed: int
    eps: float
    backend: str | None
    #: Norm of the plain (unweighted, unscaled) ascent gradient; on a plain step, of the step's gradient.
    ascent_norm: torch.Tensor | None = None
    #: A plain step of a schedule (nothing was perturbed; the descent uses the first gradients).
    plain: bool = False
    #: The descent's GradScaler scale S and 1/S (None without a scaler), its non-finite flag (either
    #: pass), and the norm of the (scaled) descent gradients when the policy asked for it.
    grad_scale: torch.Tensor | None = None
    inv_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    descent_norm: torch.Tensor | None = None
    #: Whether the base step ran, when the host knows it (the generic path reads the flag); None on the
    #: fused path, which skips on the device (``found_inf``).
    stepped: bool | None = None
    #: The engine's working state, reached only through the methods below.
    _workspace: Any = field(default=None, repr=False)

    @property
    def grads(self) -> list:
        """The current local gradients of ``plan.params`` (None for a tensor that sat out the ascent), a
        Python list made on the first read (``gradients.Gradients``)."""
        return as_list(self.collected)

    @property
    def step(self) -> int:
        """The SAM iteration (the host counter, advanced once per descent).

        NOTE (compile guards): read on demand, so that a compiled step which never asks does not guard on
        (and recompile for) the counter's value."""
        return self._workspace.step

    def norm(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(global L2 norm, non-finite flag) of ``tensors``, 0-d fp32 device tensors; all-reduced over the
        shards of FSDP2 parameters, so every rank must call it with its own shards."""
        return self._workspace.norm(self.plan, tensors)

    def backup(self, param: torch.Tensor) -> torch.Tensor:
        """The backup buffer of ``param`` (the engine's, allocated once)."""
        return self._workspace.backup(param)

    def perturb(self, plan, parts: list[tuple], norm: torch.Tensor, config_of: Callable) -> None:
        """Move to w + e now and record it as the pending ascent, for a policy whose ascent is not along
        the gradient (MomentumSAM). ``parts``: (params, directions, backups, positions, group) per call;
        ``config_of(group)``: its ``PerturbConfig``; ``plan`` None: through ``sam_kernels.ops`` (outside a
        step)."""
        self._workspace.perturb_along(plan, parts, norm, config_of, self.backend)


class Policy:
    """Plain SAM's decisions, and the interface every variant's policy overrides (module docstring).

    ``normalize=False`` is USAM (``e = rho * g``), ``renormalize`` SSAM (the descent gradient rescaled to
    the ascent gradient's norm), ``schedule`` decides which steps are SAM steps. ASAM is per param group
    (``adaptive``, ``adaptive_eta``), read from the groups at every step.
    """

    #: The variant's name in messages and in the combination table.
    name = "SAM"
    #: The fused restore-and-steps the variant runs on (``fused_steps.fused_kind``).
    fused_ops: tuple[str, ...] = ("sgd", "adam")
    #: Whether ``excluded`` may leave tensors out of the ascent (the engine asks it only then).
    drops_tensors = False
    #: Whether ``ascent_direction`` replaces the gradient as the ascent's direction (asked only then).
    directs_ascent = False
    #: Ascent steps per SAM step, each after its own backward (``first_step`` once per step; n + 1
    #: passes); ``after_ascent`` runs after each.
    ascent_steps = 1
    #: Whether micro-batches may each take their own ascent (``SAM.accumulate``): the policy keeps no
    #: state that follows a whole step's gradient (combinations.py refuses the others).
    accumulates = True

    def __init__(self, *, normalize: bool = True, renormalize: bool = False,
                 schedule: Schedule | None = None) -> None:
        check_bool("normalize_ascent", normalize)
        check_bool("renormalize", renormalize)
        self.normalize = normalize
        self.renormalize = renormalize
        self.schedule = check_schedule(schedule)

    # ---------------------------------------------------------------------- is this a SAM step?

    @property
    def decides_steps(self) -> bool:
        """Whether some steps may be plain (else the engine skips asking ``planned_sam_step``)."""
        return self.schedule is not None

    def planned_sam_step(self, step: int, seed: int) -> bool | None:
        """Whether step ``step`` is a SAM step, when known before its first backward (None: it needs the
        first gradient's norm, ``is_sam_step``). The engine asks once per step."""
        if self.schedule is None:
            return True
        if self.schedule.needs_grad_norm:
            return None
        return bool(self.schedule.decide(step, seed))

    def is_sam_step(self, step: int, seed: int, squared_norm: torch.Tensor, finite: torch.Tensor) -> bool:
        """The decision from the first gradient's squared norm (when ``planned_sam_step`` is None)."""
        return bool(self.schedule.decide(step, seed, squared_norm, finite))

    # ------------------------------------------------------------------------------ the ascent

    def excluded(self, params: list[torch.Tensor], step: int, seed: int) -> list[torch.Tensor]:
        """Parameters (of ``params``, every parameter in global order) that sit out this SAM step's ascent
        even if they hold a gradient; the engine switches their ``requires_grad`` off around the first
        backward of the steps it drives, so autograd skips them."""
        return []

    def ascent_weighting(self, group: dict) -> tuple[bool, float]:
        """(adaptive, eta) of a param group: ASAM's elementwise weight ``|w| + eta`` of the ascent."""
        adaptive = bool(group["sam_adaptive"])
        return adaptive, float(group["sam_adaptive_eta"]) if adaptive else 0.0

    def ascent_mask(self, group: dict) -> tuple[float, float]:
        """(keep_prob, scale_factor) of a param group's perturbation: an elementwise Bernoulli mask of the
        mask contract (``backends/common.py``) and a factor of the scale (none for SAM)."""
        return 1.0, 1.0

    def perturb_config(self, group: dict, eps: float, seed: int) -> PerturbConfig:
        """The perturbation of a param group: ``w += rho / (||g|| + eps) * scale_factor * m * T_w^2 g``."""
        keep_prob, scale_factor = self.ascent_mask(group)
        return PerturbConfig(rho=group["sam_rho"], eps=eps, keep_prob=keep_prob, scale_factor=scale_factor,
                             normalize=self.normalize, adaptive=bool(group["sam_adaptive"]),
                             adaptive_eta=float(group["sam_adaptive_eta"]), seed=seed)

    @property
    def needs_ascent_norm(self) -> bool:
        """Whether the descent needs the plain ascent gradient's norm (``StepContext.ascent_norm``) even
        when the ascent is weighted (ASAM): SSAM's target norm."""
        return self.renormalize

    def ascent_direction(self, context: StepContext) -> tuple[list, tuple | None] | None:
        """The direction the ascent perturbs along, in place of the first gradient (None: the gradient).

        ``context.grads`` holds the first gradients, scaled by a GradScaler's S when one drives the step
        (``context.inv_scale`` is then 1/S). Returns ``(directions, norm)``: ``directions`` in the
        gradients' true units (unscaled), one per planned parameter; ``norm`` None to take their global
        norm (weighted as ``ascent_weighting`` says), else ``(norm, nonfinite)`` of the policy's own
        making (Fisher-SAM's differs from the directions'). Called on SAM steps only, after the step's
        decision and before the perturbation."""
        return None

    def after_ascent(self, context: StepContext) -> None:
        """At the end of each ascent step of a SAM step, its gradients still in ``context.grads``."""

    # ----------------------------------------------------------------------------- the descent

    @property
    def needs_descent_norm(self) -> bool:
        """Whether ``descent`` reads ``context.descent_norm`` (else the engine may skip that pass)."""
        return self.renormalize

    def descent(self, context: StepContext) -> torch.Tensor | None:
        """The descent gradient, as a device multiplier of ``context.grads`` (None: 1), the gradients
        possibly edited in place. SAM: 1/S under a GradScaler; SSAM: ``||g|| / (||g_s|| + eps)`` too."""
        if not self.renormalize:
            return context.inv_scale
        inv_scale, norm = context.inv_scale, context.descent_norm
        true_norm = norm if inv_scale is None else norm * inv_scale
        multiplier = context.ascent_norm / (true_norm + context.eps)
        return multiplier if inv_scale is None else multiplier * inv_scale

    def after_step(self, context: StepContext) -> None:
        """After the base optimizer's step, once the iteration is counted."""

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Entries of ``state_dict()["sam"]``: ``"schedule"`` and ``"variant"`` when there is state."""
        entry = {}
        if self.schedule is not None:
            entry["schedule"] = self.schedule.state_dict()
        variant = self.variant_state()
        if variant:
            entry["variant"] = variant
        return entry

    def checked_state(self, schedule: dict | None, variant: dict | None) -> dict | None:
        """The saved variant state, checked before the optimizer changes; then the schedule's state is
        loaded (the schedule checks it before it changes anything)."""
        variant = self.checked_variant_state(variant)
        if self.schedule is not None and schedule is not None:
            self.schedule.load_state_dict(schedule)
        elif schedule:
            raise ValueError("state_dict['sam']['schedule']: this optimizer has no schedule; build it "
                             "with the schedule the checkpoint was saved with")
        return variant

    def checked_variant_state(self, state: dict | None) -> dict | None:
        """``state`` checked before anything is loaded (SAM has none to take)."""
        if state:
            raise ValueError(f"state_dict['sam']['variant']: {self.name} keeps no variant state, got "
                             f"{sorted(state)}")
        return state

    def variant_state(self) -> dict[str, Any]:
        """The variant's own state (none for SAM)."""
        return {}

    def load_variant_state(self, state: dict) -> None:
        """Take a variant state returned by ``checked_state`` (once the rest of the load succeeded)."""


def policy_options(kwargs: dict) -> dict:
    """SAM's options that belong to the policy (``normalize_ascent``, ``renormalize``, ``schedule``),
    popped from a variant class's keyword arguments, as ``Policy``'s keywords."""
    return {"normalize": kwargs.pop("normalize_ascent", True),
            "renormalize": kwargs.pop("renormalize", False), "schedule": kwargs.pop("schedule", None)}


_DEFAULTS = {"normalize_ascent": True, "renormalize": False, "schedule": None}


def resolved_policy(policy: Policy | None, **given: Any) -> Policy:
    """The policy of a ``SAM(..., policy=...)`` call: a plain-SAM ``Policy`` of SAM's own options
    (``normalize_ascent``, ``renormalize``, ``schedule``) when none is given; a given one takes those
    options itself, so they must then be left at their defaults."""
    if policy is None:
        return Policy(normalize=given["normalize_ascent"], renormalize=given["renormalize"],
                      schedule=given["schedule"])
    changed = [name for name, value in given.items() if value is not _DEFAULTS[name]]
    if changed:
        raise TypeError(f"{', '.join(changed)}: options of the policy; pass them to {type(policy).__name__}")
    return policy
