"""SAM: sharpness-aware minimization as a torch.optim optimizer over the fused op layer.

One SAM step is an ascent (``first_step``: back up w, move to w + e) after the first backward and a
descent (``second_step``: restore w, base optimizer step with the second gradient) after the second.
The class owns the bookkeeping; every pass over the weights is one op of ``sam_kernels.ops``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .. import backends, ops
from ..backends.common import PerturbConfig, same_layout
from ..distributed import all_reduce_norm, local_tensor, shard_group
from . import amp, closure_convention, descent, fused_steps
from .base import make_base
from .bn import freeze_bn_stats
from .checks import (
    adopt_group_options,
    check_base_options,
    check_bool,
    check_distinct,
    check_group,
    check_non_negative,
    check_optional_bool,
    check_positive,
    check_state_shapes,
    checked_sam_entry,
)
from .plan import StepPlan
from .schedules import Schedule, check_schedule


def _default_seed() -> int:
    """torch's initial seed: repeatable under ``torch.manual_seed`` without consuming the global stream
    (building the optimizer leaves the user's data order and initialization untouched)."""
    return torch.initial_seed()


def _select(items: list, mask: list[bool] | None) -> list:
    """The items where ``mask`` is True (all of them for no mask)."""
    if mask is None:
        return items
    return [item for item, keep in zip(items, mask, strict=True) if keep]


# ----------------------------------------------------------------------------------- optimizer


@torch.compiler.disable
def _advance_host_step(run: _RunState) -> None:
    """One more SAM step on the host counter.

    NOTE (compile guards): dynamo specializes on Python ints it reads, so incrementing the counter in
    traced code would guard on its value and recompile the step every step; left untraced, the
    counter costs one graph break at the end of the descent instead.
    """
    run.step += 1


@dataclass
class _RunState:
    """What changes from step to step, held outside the optimizer object.

    NOTE: torch.compile (dynamo) models a torch.optim.Optimizer specially and drops attribute writes
    on it made inside a compiled region; writes to this plain object are kept.
    """

    #: What ``first_step`` leaves for the descent; None outside a SAM step.
    ascent: _Ascent | None = None
    #: SAM iterations on the host (saved by state_dict); ``device_step`` mirrors it on the parameters'
    #: device for the kernels (no copy per step). Both advance together, once per descent, skipped
    #: steps included.
    step: int = 0
    device_step: torch.Tensor | None = None
    #: The step plan (plan.py) and the counter whose bumps invalidate it.
    plan: StepPlan | None = None
    plan_generation: int = 0
    #: (step, decision) of a host schedule, made once per step (ESAM's SWP asks before the ascent).
    decision: tuple[int, bool] | None = None
    #: The gradients as ``step(closure)`` or ``zero_grad()`` last left them, to tell a first pass the
    #: loop ran itself (see closure_convention.py); None after any other descent.
    grad_marks: Any = closure_convention.CLEARED
    warned_ascent_context: bool = False


@dataclass
class _Ascent:
    """What ``first_step`` leaves for ``second_step``."""

    #: The step plan of the ascent.
    plan: StepPlan
    #: Per planned parameter, whether it was perturbed (None: every one was).
    kept: list[bool] | None
    #: Global norm of the plain ascent gradient (the target norm of SSAM's renormalization).
    grad_norm: torch.Tensor
    #: 1.0 when the ascent gradient was not finite (the weights were then left unperturbed).
    nonfinite: torch.Tensor
    #: The enabled GradScaler of the ascent (``first_step(grad_scaler=...)``), else None.
    grad_scaler: Any = None
    #: (local params, backups) of each perturb call made: what a restore puts back.
    perturbed: list = field(default_factory=list)
    #: A plain step (the schedule said no SAM): nothing was perturbed and the descent uses the first
    #: gradients, put aside in ``stashed`` when ``first_step(zero_grad=True)`` cleared them.
    plain: bool = False
    stashed: list | None = None


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization over any torch.optim base optimizer.

    ``base_optimizer`` is a torch.optim class (its options as extra keyword arguments, the convention of
    the popular implementations) or an optimizer instance. Per-group options: ``rho``, ``adaptive``
    (ASAM, weight ``|w| + adaptive_eta``), ``adaptive_eta``. Optimizer-wide: ``sam_eps`` (of the ascent
    scale and of SSAM's ratio), ``normalize_ascent=False`` (USAM's ``e = rho * g``), ``renormalize``
    (SSAM: the descent gradient rescaled to the ascent gradient's norm), ``seed`` (of the random
    masks; default ``torch.initial_seed()``),
    ``fused`` (None: fully fused restore-and-step when the base is SGD/Adam/AdamW with options it can
    honour, else the generic path; True: require it; False: the generic path, whose descent is the base
    optimizer's own ``step``), ``foreach`` (forwarded to the base optimizer; True also selects the
    generic path), ``backend`` (the op backend: None/"auto", "torch" or "triton"), ``capturable``
    (CUDA graphs: requires the fused descent; the RNG step lives on the device from construction,
    advances there and keeps its address, and no step reads a device value on the host; the host step
    counter is refreshed from the device by ``state_dict``).

    ``param_groups`` and ``state`` are the base optimizer's own objects, so LR schedulers, ``zero_grad``
    and ``add_param_group`` act on both, and ``state_dict`` is the base optimizer's (torch format) plus
    the SAM entry ``"sam": {"seed", "step"}``.

    AMP: ``first_step(grad_scaler=scaler)`` after the first scaled backward, ``scaler.step(optimizer)``
    and ``scaler.update()`` after the second (``_step_supports_amp_scaling``: the scaler hands over its
    scale and found-inf tensors, SAM unscales on the device and skips on inf in either pass).
    ``ascent_context``: a callable returning a context manager that wraps the first forward and backward
    of ``step(closure)`` and ``ESAM.sds_step`` (for DDP, ``model.no_sync``: a per-worker ascent).
    """

    #: torch.amp.GradScaler.step hands this optimizer ``grad_scale`` and ``found_inf`` tensors instead of
    #: unscaling and checking the gradients itself (see ``step``).
    _step_supports_amp_scaling = True
    #: Marks SAM and its subclasses, which cannot be the base optimizer of another SAM.
    _is_sam_optimizer = True

    def __init__(self, params: Iterable | None, base_optimizer, *, rho: float = 0.05,
                 adaptive: bool = False, adaptive_eta: float = 0.0, sam_eps: float = 1e-12,
                 normalize_ascent: bool = True, renormalize: bool = False, seed: int | None = None,
                 foreach: bool | None = None, fused: bool | None = None, backend: str | None = None,
                 capturable: bool = False, schedule: Schedule | None = None, **base_kwargs: Any) -> None:
        check_non_negative("rho", rho)
        check_bool("adaptive", adaptive)
        check_non_negative("adaptive_eta", adaptive_eta)
        check_positive("sam_eps", sam_eps)
        check_bool("normalize_ascent", normalize_ascent)
        check_bool("renormalize", renormalize)
        check_optional_bool("fused", fused)
        check_optional_bool("foreach", foreach)
        check_bool("capturable", capturable)
        check_schedule(schedule)
        if capturable and schedule is not None:
            raise ValueError("capturable=True: a schedule decides on the host at every step whether the "
                             "second pass runs, which a captured graph cannot replay; use schedule=None")
        if capturable and (fused is False or foreach):
            raise ValueError("capturable=True: needs the fused descent (the generic one reads the "
                             "non-finite flag on the host); leave fused and foreach unset")
        if fused and foreach:
            raise ValueError("fused and foreach: cannot both be True (fused=True is the fully fused "
                             "restore-and-step, foreach=True the base optimizer's own step)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**64):
            raise ValueError(f"seed: must be an int in [0, 2**64), got {seed!r}")
        base = make_base(params, base_optimizer, base_kwargs, foreach)
        sam_defaults = {"sam_rho": rho, "sam_adaptive": adaptive, "sam_adaptive_eta": adaptive_eta}
        for group in base.param_groups:
            adopt_group_options(group, base.defaults, sam_defaults)
        super().__init__(base.param_groups, sam_defaults)
        self.base_optimizer = base
        self._share_base()
        self.defaults = {**base.defaults, **self.defaults}
        check_distinct(self.param_groups)
        self.eps = float(sam_eps)
        self.normalize_ascent = normalize_ascent
        self.renormalize = renormalize
        self.seed = _default_seed() if seed is None else seed
        self.fused = fused
        self.foreach = foreach
        self.backend = backend
        self._backups: dict[torch.Tensor, torch.Tensor] = {}
        self._run = _RunState()
        self.ascent_context: Callable[[], contextlib.AbstractContextManager] | None = None
        self.capturable = capturable
        self.schedule = schedule
        backends.resolve(self._device(), backend)
        self._descent_kind()
        self._run.grad_marks = closure_convention.record(self._params())
        if capturable:
            if self._descent_kind() is None:
                raise ValueError(f"capturable=True: {fused_steps.unsupported_reason(base)}")
            self._rng_step(self._device())

    # ------------------------------------------------------------------ torch.optim conventions

    def _share_base(self) -> None:
        # NOTE: SAM and its base optimizer share the param-group list and the state dict (the same
        # objects), so anything that edits one edits the other; rebind after the base rebinds them.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._shared = (self.param_groups, self.state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to SAM and its base optimizer (SAM's defaults fill missing options)."""
        base = self.__dict__.get("base_optimizer")
        if base is None:  # inside torch.optim.Optimizer.__init__, before the base is attached
            super().add_param_group(param_group)
            check_group(self.param_groups[-1], len(self.param_groups) - 1)
            return
        adopt_group_options(param_group, base.defaults, self.defaults)
        self.invalidate_plan()
        base.add_param_group(param_group)
        try:
            check_group(self.param_groups[-1], len(self.param_groups) - 1)
            check_distinct(self.param_groups)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"sam": {"seed", "step"}``."""
        self._check_not_perturbed("state_dict()")
        state = self.base_optimizer.state_dict()
        if self.capturable and self._run.device_step is not None:
            # NOTE: replays of a captured graph advance the device step only; read it (one sync, at
            # checkpoint time).
            self._run.step = int(self._run.device_step)
        state["sam"] = {"seed": self.seed, "step": self._run.step}
        if self.schedule is not None:
            state["sam"]["schedule"] = self.schedule.state_dict()
        variant = self._variant_state()
        if variant:
            state["sam"]["variant"] = variant
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a ``state_dict()`` result; a plain base-optimizer state dict also loads (the SAM
        seed and step are then kept).

        NOTE (atomic load): everything is checked before the optimizer changes: the SAM entry, every
        group's SAM and base options, and each state tensor's shape against its parameter. On an error
        the optimizer is exactly as before (torch's load builds new group and state objects, so the old
        ones are put back).
        """
        self._check_not_perturbed("load_state_dict()")
        state_dict = dict(state_dict)
        seed, step, schedule_state, variant_state = checked_sam_entry(
            state_dict.pop("sam", None), self.seed, self._run.step)
        variant_state = self._checked_variant_state(variant_state)
        if self.schedule is not None and schedule_state is not None:
            self.schedule.load_state_dict(schedule_state)  # checks before changing anything
        elif schedule_state:
            raise ValueError("state_dict['sam']['schedule']: this optimizer has no schedule; build it "
                             "with the schedule the checkpoint was saved with")
        base = self.base_optimizer
        previous = {"state": base.state, "param_groups": base.param_groups}
        try:
            base.load_state_dict(state_dict)
            self._share_base()
            for index, (group, old) in enumerate(zip(self.param_groups, previous["param_groups"],
                                                      strict=True)):
                adopt_group_options(group, base.defaults, self.defaults)
                check_group(group, index)
                check_base_options(base, group, index, old)
            check_state_shapes(self.param_groups, self.state)
            self._descent_kind()
        except BaseException:
            base.__dict__.update(previous)
            self._share_base()
            raise
        self.seed, self._run.step, self._run.decision = seed, step, None
        if variant_state is not None:
            self._load_variant_state(variant_state)
        self.invalidate_plan()
        if self.capturable and self._run.device_step is not None:
            self._run.device_step.fill_(self._run.step)  # keeps its address for captured graphs
        else:
            self._run.device_step = None

    def __getstate__(self) -> dict[str, Any]:
        # NOTE: torch.optim.Optimizer pickles only defaults, state and param_groups; SAM also needs its
        # base optimizer and options (copy.deepcopy and pickling go through here).
        return dict(self.__dict__)

    # ------------------------------------------------------------------------- training loops

    @property
    def uses_fused_step(self) -> bool:
        """Whether ``second_step`` runs the fully fused restore-and-step (else the generic path)."""
        return self._descent_kind() is not None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step driven by a closure; two forward/backward passes in either convention.

        torch.optim's convention: ``closure`` zeroes the gradients, computes the loss, calls backward and
        returns the loss; it runs twice, at w and at w + e (the first call inside ``ascent_context`` when
        set), and ``step`` returns the loss at w.

        The popular SAM convention: the loop has already run the first forward and backward at w (since
        the last step or ``zero_grad()``) and the closure only computes and backpropagates; those
        gradients are the ascent's, the closure runs once, at w + e, and ``step`` returns None (the loss
        at w is the loop's own). See closure_convention.py for how the two are told apart.

        BatchNorm running statistics are frozen during the call at w + e.

        Without a closure, between ``first_step()`` and the descent, ``step()`` is the descent: this is
        how ``torch.amp.GradScaler.step(optimizer)`` drives SAM, handing over its ``grad_scale`` (None
        when ``scaler.unscale_(optimizer)`` already ran) and ``found_inf`` tensors as attributes.
        """
        return self._step(closure)

    # NOTE (step hooks): torch.optim wraps a class's ``step`` with its hook runner unless the function is
    # marked ``hooked``; SAM runs the hooks itself (``_run_step_hooks``) so that every calling style runs
    # each hook exactly once, the pre-hooks before the ascent and the post-hooks after the descent.
    step.hooked = True

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        """The body of ``step``, shared with subclasses."""
        scaler_attributes = hasattr(self, "grad_scale") or hasattr(self, "found_inf")
        if closure is None:
            if self._run.ascent is None and scaler_attributes:
                raise TypeError("step() from torch.amp.GradScaler.step without first_step(): SAM needs "
                                "its first pass unscaled by the scaler: call first_step(grad_scaler="
                                "scaler) after the first backward, the second backward, then "
                                "scaler.step(optimizer). Under Lightning with precision='16-mixed', "
                                "train with plugins=[sam_kernels.integrations.lightning."
                                "SAMMixedPrecision('16-mixed', 'cuda')] instead of precision=")
            if self._run.ascent is None:
                raise TypeError("step(): SAM needs a closure (it evaluates the loss twice); or call "
                                "first_step() and second_step() around your own backward passes")
            self._descend(getattr(self, "grad_scale", None), getattr(self, "found_inf", None),
                          from_step=True)
            return None
        if scaler_attributes:
            raise RuntimeError("step(closure) under torch.amp.GradScaler is not supported (the scaler "
                               "checks the gradients before the closure runs); use first_step("
                               "grad_scaler=scaler), the second backward, then scaler.step(optimizer)")
        params = self._params()
        loss = None
        if closure_convention.first_pass_done(params, self._run.grad_marks, type(self).__name__):
            self._warn_ascent_context_unused()
        else:
            with torch.enable_grad(), self._ascent_pass():
                loss = closure()
        self.first_step(zero_grad=True)
        if self.needs_second_pass():
            with self.second_pass():
                closure()
        self.second_step()
        self._run.grad_marks = closure_convention.record(params)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; also records that the gradients were cleared, so that a later
        ``step(closure)`` can tell gradients computed since then (see ``step``)."""
        super().zero_grad(set_to_none)
        self._run.grad_marks = (closure_convention.CLEARED if set_to_none
                                else closure_convention.record(self._params()))

    def _warn_ascent_context_unused(self) -> None:
        """The loop ran the first backward itself, so ``ascent_context`` (DDP's ``no_sync``) could not
        wrap it: say so once."""
        if self.ascent_context is not None and not self._run.warned_ascent_context:
            self._run.warned_ascent_context = True
            warnings.warn("step(closure): the first backward ran before step(closure), outside "
                          "ascent_context, so this ascent used the synced gradient; for a per-worker "
                          "ascent let the closure compute the first pass too (zero_grad() before "
                          "step(closure)) or use first_step/second_step with per_worker_ascent",
                          stacklevel=3)

    def needs_second_pass(self) -> bool:
        """After ``first_step``: whether this step is a SAM step, so the second forward and backward
        must run before the descent. False on a plain step of a ``schedule``: then call
        ``second_step()`` (or ``scaler.step``) right away; it steps with the first gradients (kept even
        when ``first_step(zero_grad=True)`` cleared them)."""
        if self._run.ascent is None:
            raise RuntimeError("needs_second_pass(): call it after first_step()")
        return not self._run.ascent.plain

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """The context of the second forward and backward, at w + e: gradients enabled, BatchNorm
        running statistics frozen (they were updated at w), and the weights put back to w if the block
        raises (so an error never leaves them perturbed)."""
        with self._restoring_on_error(), torch.enable_grad(), freeze_bn_stats():
            yield

    def _planned_sam_step(self) -> bool | None:
        """This step's decision when it is known before the first backward (True without a schedule),
        None when it needs the first gradient (AE-SAM)."""
        schedule = self.schedule
        if schedule is None:
            return True
        if schedule.needs_grad_norm:
            return None
        step = self._run.step
        if self._run.decision is None or self._run.decision[0] != step:
            self._run.decision = (step, bool(schedule.decide(step, self.seed)))
        return self._run.decision[1]

    def _run_step_hooks(self, which: str) -> None:
        """torch.optim's step pre- or post-hooks (global ones included): ``first_step`` runs the pre-hooks,
        the descent (``second_step``, or ``step()`` from GradScaler) the post-hooks, so each runs once per
        SAM step in every style. A pre-hook's returned arguments have nothing to replace and are ignored.
        """
        if which == "pre":
            hooks = chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values())
        else:
            hooks = chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values())
        for hook in hooks:
            hook(self, (self,), {})

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Ascent: back up w, then w += e from the current gradients (a no-op on a non-finite gradient).

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first loss. Its scale is divided
        out on the device (folded into the norm; with ``normalize_ascent=False`` the gradients are
        unscaled in place); the descent must then go through ``scaler.step(optimizer)``. A disabled
        scaler is ignored.
        """
        if self._run.ascent is not None:
            raise RuntimeError("first_step(): called twice; a SAM step is first_step() then "
                               "second_step()")
        scaler = grad_scaler if amp.scaler_enabled(grad_scaler) else None
        self._run_step_hooks("pre")
        excluded = self._excluded_from_ascent()
        plan, grads = self._current_plan(frozenset(map(id, excluded)))
        kept = self._kept_in_ascent(plan, excluded)
        norm, nonfinite = self._ascent_norm(plan, grads, kept)
        plain_norm = norm
        wants_plain_norm = self.renormalize or self._planned_sam_step() is None
        if wants_plain_norm and any(g.group["sam_adaptive"] for g in plan.groups):
            plain_norm = self._norm(plan, _select(grads, kept))[0]
        inv_scale = None
        if scaler is not None:
            scale = amp.current_scale(scaler, plan.device)
            inv_scale = amp.inverse(scale)
            plain_norm = plain_norm * inv_scale
        if not self._is_sam_step(plain_norm, nonfinite):
            self._plain_ascent(plan, plain_norm, nonfinite, scaler, zero_grad)
            return
        if scaler is not None:
            if self.normalize_ascent:
                # NOTE: the op's scale is rho / (norm + eps) times the scaled gradient S * g; passing
                # norm_S + (S - 1) * eps makes it rho / (||g|| + eps) * g, the unscaled ascent. A
                # non-finite norm stays non-finite, so the op still leaves the weights untouched.
                norm = norm + (scale - 1.0) * self.eps
            elif grads:
                torch._foreach_mul_(_select(grads, kept), inv_scale)
        # NOTE (atomic ascent): the ascent is recorded before the first perturbation, so that an error
        # in a later group's op puts the groups already perturbed back to w (``_restoring_on_error``).
        ascent = self._run.ascent = _Ascent(plan, kept, plain_norm, nonfinite, scaler)
        if plan.params:
            step = self._rng_step(plan.device)
            with self._restoring_on_error():
                for group_plan in plan.groups:
                    rows = slice(group_plan.start, group_plan.stop)
                    params, backups = plan.local[rows], plan.backups[rows]
                    group_grads, positions = grads[rows], group_plan.positions
                    if kept is not None:
                        mask = kept[rows]
                        params, backups = _select(params, mask), _select(backups, mask)
                        group_grads, positions = _select(group_grads, mask), _select(positions, mask)
                        if not params:
                            continue
                    group = group_plan.group
                    config = PerturbConfig(eps=self.eps, normalize=self.normalize_ascent,
                                           adaptive=bool(group["sam_adaptive"]),
                                           adaptive_eta=float(group["sam_adaptive_eta"]), seed=self.seed,
                                           **self._perturb_options(group))
                    plan.backend.perturb_(params, group_grads, backups, positions, norm, step, config)
                    ascent.perturbed.append((params, backups))
        self._after_ascent(plan, grads)
        if zero_grad:
            self._clear_grads()

    def _is_sam_step(self, plain_norm: torch.Tensor, nonfinite: torch.Tensor) -> bool:
        """The schedule's decision for this step (True without a schedule)."""
        planned = self._planned_sam_step()
        if planned is not None:
            return planned
        return bool(self.schedule.decide(self._run.step, self.seed, plain_norm.square(), nonfinite == 0))

    def _plain_ascent(self, plan: StepPlan, grad_norm: torch.Tensor, nonfinite: torch.Tensor,
                      scaler: Any, zero_grad: bool) -> None:
        """A plain step's ascent: nothing perturbed; the gradients are put aside if cleared (no copy)."""
        ascent = self._run.ascent = _Ascent(plan, [False] * len(plan.params), grad_norm, nonfinite, scaler,
                                            plain=True)
        if zero_grad:
            ascent.stashed = [param.grad for param in plan.params]
            self._clear_grads()

    def second_step(self, zero_grad: bool = False) -> None:
        """Descent: restore w, then the base optimizer's step with the current (second) gradients.

        A non-finite gradient in either pass skips the step: the weights are the pre-step weights bit for
        bit and the base optimizer's state is unchanged. After ``first_step(grad_scaler=scaler)`` the
        descent is ``scaler.step(optimizer)`` instead.
        """
        if self._run.ascent is not None and self._run.ascent.grad_scaler is not None:
            self._abandon_ascent()
            raise RuntimeError("second_step(): the ascent ran under a GradScaler, so the descent must "
                               "go through scaler.step(optimizer), which unscales the second gradients; "
                               "the weights were restored and this step skipped")
        self._descend(None, None, zero_grad=zero_grad)

    @torch.no_grad()
    def _descend(self, grad_scale: torch.Tensor | None, scaler_found_inf: torch.Tensor | None, *,
                 zero_grad: bool = False, from_step: bool = False) -> None:
        """The descent; ``grad_scale`` and ``scaler_found_inf`` come from GradScaler.step."""
        if scaler_found_inf is not None and not isinstance(scaler_found_inf, torch.Tensor):
            # NOTE: GradScaler sums its per-device flags; with no gradient to check (a plain step whose
            # gradients were put aside) the sum is the int 0, and the ascent's flag covers them.
            scaler_found_inf = torch.tensor(float(scaler_found_inf))
        if self._run.ascent is None:
            raise RuntimeError("second_step(): no first_step() before it")
        ascent = self._run.ascent
        from_scaler = from_step and scaler_found_inf is not None
        if ascent.grad_scaler is not None and not from_scaler:
            self._abandon_ascent()
            raise RuntimeError("step(): the ascent ran under a GradScaler but the descent did not come "
                               "from scaler.step(optimizer); the weights were restored and this step "
                               "skipped")
        if from_scaler and ascent.grad_scaler is None and grad_scale is not None:
            self._abandon_ascent()
            raise RuntimeError("scaler.step(optimizer): the ascent's gradients were scaled too; pass "
                               "first_step(grad_scaler=scaler); the weights were restored and this step "
                               "skipped")
        # NOTE (atomic descent): the ascent is forgotten only once the descent has run; any error before
        # that (a bad gradient, a state tensor that does not fit, a failing base step) puts the weights
        # back to w and leaves the optimizer state as it was.
        with self._restoring_on_error():
            plan = self._descend_from(ascent, grad_scale, scaler_found_inf)
        self._run.ascent = None
        self._run.grad_marks = None  # NOTE: step(closure) records again once its descent is done
        _advance_host_step(self._run)
        if self._run.device_step is not None:
            self._run.device_step.add_(1)
        with self._restoring_on_error():
            self._after_step(plan)
        # NOTE: torch's LR schedulers warn unless the optimizer marks itself as stepped; the two-call
        # loop never calls step(), so second_step sets the flag that their step() wrapper would set.
        self._opt_called = True
        self.base_optimizer._opt_called = True  # a scheduler may be attached to the base optimizer
        self._run_step_hooks("post")
        if zero_grad:
            self._clear_grads()

    def _descend_from(self, ascent: _Ascent, grad_scale: torch.Tensor | None,
                      scaler_found_inf: torch.Tensor | None) -> StepPlan:
        """The descent proper: the second gradients' norm and flag, then the fused or generic step;
        returns the plan it ran."""
        plan, kept = ascent.plan, ascent.kept
        if ascent.stashed is not None:
            # NOTE: a plain step whose second backward was skipped: the first gradients come back.
            for param, grad in zip(plan.params, ascent.stashed, strict=True):
                if param.grad is None:
                    param.grad = grad
        grads = plan.grads() if plan is not None else None
        if grads is None or plan is not self._run.plan or self._plan_key() != plan.key:
            # NOTE: the gradient set changed between the passes (rare): put w back first, then descend
            # with a plan of the current gradients from unperturbed weights.
            self._restore(ascent)
            plan, grads = self._current_plan()
            kept = [False] * len(plan.params)
        else:
            plan.check_grads(grads)
        norm_of = functools.partial(self._norm, plan)
        found_inf, multiplier = descent.flag_and_multiplier(
            ascent.nonfinite, ascent.grad_norm if self.renormalize else None, norm_of, grads,
            grad_scale, scaler_found_inf, self.eps, plan.device)
        if ascent.grad_scaler is not None:
            amp.record_found_inf(ascent.grad_scaler, self, found_inf)
        self._before_descent(ascent, plan, grads, found_inf, grad_scale)
        if plan.kind is None:
            self._restore(ascent)
            descent.generic(plan, found_inf, multiplier, self.base_optimizer)
        else:
            descent.fused(plan, grads, kept, found_inf, multiplier, self.state)
        return plan

    # -------------------------------------------------------------- hooks for the variants

    def _after_ascent(self, plan: StepPlan, grads: list[torch.Tensor]) -> None:
        """Called at the end of a SAM step's ascent, before the gradients are cleared."""

    def _before_descent(self, ascent: _Ascent, plan: StepPlan, grads: list[torch.Tensor],
                        found_inf: torch.Tensor, grad_scale: torch.Tensor | None) -> None:
        """Called once the descent's flag is known, before the descent reads the gradients."""

    def _after_step(self, plan: StepPlan) -> None:
        """Called after the descent, once the step is counted, before the post-hooks."""

    def _variant_state(self) -> dict[str, Any]:
        """A variant's own state for ``state_dict()["sam"]["variant"]`` (none for SAM)."""
        return {}

    def _checked_variant_state(self, state: dict | None) -> dict | None:
        """``state`` checked before anything is loaded (SAM has none to take)."""
        if state:
            raise ValueError(f"state_dict['sam']['variant']: {type(self).__name__} keeps no variant "
                             f"state, got {sorted(state)}")
        return state

    def _load_variant_state(self, state: dict) -> None:
        """Take a state checked by ``_checked_variant_state``."""

    def _excluded_from_ascent(self) -> set[torch.Tensor]:
        """Parameters that sit out the ascent even if they hold a gradient."""
        return set()

    def _perturb_options(self, group: dict) -> dict[str, Any]:
        """Per-group radius and keep probability of the perturbation."""
        return {"rho": group["sam_rho"], "keep_prob": 1.0}

    def _ascent_pass(self) -> contextlib.AbstractContextManager:
        """The context of the first (ascent) forward and backward in ``step(closure)``: ``ascent_context``
        on SAM steps only.

        NOTE (plain steps under DDP): a plain step of a schedule descends with the first gradient, which
        must then be the synced one, so a per-worker ascent context (``model.no_sync``) is left out; a
        schedule that decides only after the first backward (AE-SAM) cannot know, so it is refused."""
        if self.ascent_context is None:
            return contextlib.nullcontext()
        planned = self._planned_sam_step()
        if planned is None:
            raise ValueError(f"ascent_context: {type(self.schedule).__name__} decides after the first "
                             "backward whether the step is plain, and a plain step needs that backward "
                             "synced; use a globally synced ascent (no ascent_context) or a host "
                             "schedule")
        return self.ascent_context() if planned else contextlib.nullcontext()

    def planned_sam_step(self) -> bool | None:
        """Whether the coming step is a SAM step, when that is known before its first backward (True
        without a schedule; None for AE-SAM, which decides after it). A two-call loop under DDP with a
        per-worker ascent wraps the first backward in ``no_sync`` only when this is True
        (``sam_kernels.distributed.per_worker_ascent(model, optimizer)`` does that)."""
        return self._planned_sam_step()

    # ------------------------------------------------------------------------------ internals

    def _params(self) -> list[torch.Tensor]:
        """Every parameter, in the param groups' order."""
        return [param for group in self.param_groups for param in group["params"]]

    def _device(self) -> torch.device:
        """The parameters' device (the op layer takes one device per call)."""
        for group in self.param_groups:
            for param in group["params"]:
                return param.device
        return torch.device("cpu")

    def _check_not_perturbed(self, what: str) -> None:
        if self._run.ascent is not None:
            raise RuntimeError(f"{what}: the weights are perturbed between first_step() and "
                               "second_step(); call it after second_step()")

    def _descent_kind(self) -> str | None:
        """``"sgd"``/``"adam"`` for the fully fused descent, None for the generic path."""
        if self.fused is False or self.foreach:
            return None
        reason = fused_steps.unsupported_reason(self.base_optimizer)
        if reason is None and self._shard_group() is not None:
            reason = ("the parameters are sharded DTensors (FSDP2); the base optimizer's own step "
                      "updates them")
        if reason is None:
            return fused_steps.fused_kind(self.base_optimizer)
        if self.fused:
            raise ValueError(f"fused=True: {reason}; use fused=None (the generic path when the fused "
                             "one cannot run) or fused=False")
        return None

    def _plan_key(self) -> tuple:
        """What a step plan depends on besides the parameters' storage and the gradient set (see
        plan.py): cheap to compute, O(param groups)."""
        kind = self._descent_kind()
        groups = self.param_groups
        return (self._run.plan_generation, id(groups), id(self.state), len(self.state),
                tuple(map(id, groups)), tuple(len(group["params"]) for group in groups), kind,
                fused_steps.structure(kind, groups))

    def _current_plan(self, may_lack: frozenset[int] = frozenset()) -> tuple[StepPlan, list]:
        """The step plan (rebuilt when stale) and the current local gradients of its parameters
        (None for those in ``may_lack``, ids of parameters sitting out the ascent, that have none)."""
        base = self.base_optimizer
        if self.param_groups is not base.param_groups or self.state is not base.state:
            # NOTE: the base optimizer's own load_state_dict (called directly) rebinds its group list
            # and state dict, or the user assigned SAM's: share them again (the side that changed
            # wins), with SAM's options filled in and checked.
            shared_groups, shared_state = self._shared
            if base.param_groups is shared_groups and base.state is shared_state:
                base.param_groups, base.state = self.param_groups, self.state
            self._share_base()
            for index, group in enumerate(self.param_groups):
                adopt_group_options(group, base.defaults, self.defaults)
                check_group(group, index)
        key = self._plan_key()
        plan = self._run.plan
        if plan is not None and plan.is_current(key, self.param_groups):
            grads = plan.grads(may_lack)
            if grads is not None:
                plan.check_grads(grads)
                return plan, grads
        plan = self._run.plan = StepPlan(self, key, kind=key[6], previous=plan)
        return plan, plan.grads()

    def invalidate_plan(self) -> None:
        """Rebuild the step plan at the next step. Only needed after replacing entries of ``state`` by
        hand; every other change (param groups, parameters' storage, gradients, loaded state) is seen."""
        self._run.plan_generation += 1
        self._run.plan = None

    def _kept_in_ascent(self, plan: StepPlan, excluded) -> list[bool] | None:
        """Per planned parameter whether it takes part in the ascent (None: all do)."""
        if not excluded:
            return None
        ids = {id(p) for p in excluded}
        return [id(p) not in ids for p in plan.params]

    def _norm(self, plan: StepPlan, grads: list[torch.Tensor], weights: list[torch.Tensor] | None = None,
              adaptive_eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Global norm and non-finite flag of ``grads`` (zeros on the device when empty); over the
        local shards and all-reduced when the parameters are sharded (FSDP2)."""
        if grads:
            norm, nonfinite = plan.backend.grad_norm(grads, weights, adaptive_eta)
        else:
            norm = torch.zeros((), dtype=torch.float32, device=plan.device)
            nonfinite = norm.clone()
        group = self._shard_group() if plan.sharded else None
        if group is None:
            return norm, nonfinite
        # NOTE: every rank holds a shard of every parameter, so every rank takes part in each call.
        norm = all_reduce_norm(norm, group)
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX, group=group)
        return norm, torch.maximum(nonfinite, (~torch.isfinite(norm)).float())

    def _shard_group(self):
        """The process group of sharded (FSDP2) parameters, or None."""
        return shard_group(p for group in self.param_groups for p in group["params"])

    def _ascent_norm(self, plan: StepPlan, grads: list[torch.Tensor],
                     kept: list[bool] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Global norm of the ascent gradients, each group weighted by its own ASAM options."""
        keys = [(bool(g.group["sam_adaptive"]),
                 float(g.group["sam_adaptive_eta"]) if g.group["sam_adaptive"] else 0.0)
                for g in plan.groups]
        if kept is None and len(set(keys)) <= 1:  # the usual case: one call over the plan's lists
            adaptive, eta = keys[0] if keys else (False, 0.0)
            return self._norm(plan, grads, plan.local if adaptive else None, eta)
        parts: dict[tuple[bool, float], tuple[list, list]] = defaultdict(lambda: ([], []))
        for key, group_plan in zip(keys, plan.groups, strict=True):
            rows = slice(group_plan.start, group_plan.stop)
            mask = kept[rows] if kept is not None else None
            part_grads, part_weights = parts[key]
            part_grads.extend(_select(grads[rows], mask))
            part_weights.extend(_select(plan.local[rows], mask))
        results = [self._norm(plan, part_grads, part_weights if adaptive else None, eta)
                   for (adaptive, eta), (part_grads, part_weights) in parts.items() if part_grads]
        if len(results) <= 1:
            return results[0] if results else self._norm(plan, [])
        total = torch.stack([norm for norm, _ in results]).square().sum().sqrt()
        flags = torch.stack([flag for _, flag in results] + [(~torch.isfinite(total)).float()])
        return total, flags.amax()

    def _backup(self, param: torch.Tensor) -> torch.Tensor:
        """The backup buffer of ``param`` (allocated once, reallocated if the parameter changed); of its
        local shard for a DTensor."""
        backup = self._backups.get(param)
        local = local_tensor(param)
        if (backup is None or backup.shape != local.shape or backup.dtype != local.dtype
                or backup.device != local.device or not same_layout(backup, local)):
            backup = torch.empty_like(local)  # the parameter's layout (see "layout" in common.py)
            self._backups[param] = backup
        return backup

    def _rng_step(self, device: torch.device) -> torch.Tensor:
        if self._run.device_step is None or self._run.device_step.device != device:
            self._run.device_step = torch.tensor(self._run.step, dtype=torch.int64, device=device)
        return self._run.device_step

    def _restore(self, ascent: _Ascent) -> None:
        """w = backup for every parameter the ascent perturbed (idempotent: the backups hold w until the
        next ascent)."""
        for params, backups in ascent.perturbed:
            if ascent.plan is not None:
                ascent.plan.backend.restore_(params, backups)
            else:  # perturbed outside a step (MomentumSAM.perturb): through the op layer
                ops.restore_(params, backups, backend=self.backend)

    def _clear_grads(self) -> None:
        """``zero_grad()`` (gradients set to None) without torch.optim's profiler wrapper, which
        torch.compile does not trace: a graph break inside first_step or second_step would split them."""
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def _abandon_ascent(self) -> None:
        """Put the perturbed weights back to w and forget the ascent.

        NOTE: the backups hold w until the next ascent writes them, so this is right at any point of the
        descent too: a restore already done (generic path) or a weight already stepped is set to w again.
        """
        ascent, self._run.ascent = self._run.ascent, None
        if ascent is not None:
            with torch.no_grad():
                self._restore(ascent)

    @contextlib.contextmanager
    def _restoring_on_error(self) -> Iterator[None]:
        """If the block raises while the weights are perturbed, put them back to w and re-raise."""
        try:
            yield
        except BaseException:
            self._abandon_ascent()
            raise
