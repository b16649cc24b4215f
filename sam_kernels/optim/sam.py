"""SAM: the engine every SAM-family optimizer runs on, and sharpness-aware minimization itself.

One SAM step is an ascent (``first_step``: back up w, move to w + e) after the first backward and a
descent (``second_step``: restore w, base optimizer step with the second gradient) after the second.
The engine owns what every variant shares: torch.optim's surface, the three calling styles (two calls,
closure, GradScaler), AMP, rollback on error, the step plan, FSDP2 norms and the RNG step. A variant is a
``policy.Policy`` that decides the rest; this class with the default policy is SAM (with ASAM, USAM,
SSAM and the schedules as options). Every pass over the weights is one op of the backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .. import backends
from . import accumulation, amp, closure_convention, combinations, descent, fused_steps, surface
from .ascent import ascend, ascend_further, ascent_pass
from .base import make_base, run_step_hooks
from .bn import freeze_bn_stats
from .checks import adopt_group_options, check_distinct, check_engine_options, check_group
from .policy import Policy, StepContext, resolved_policy
from .schedules import Schedule
from .styles import closure_step, one_pass_step, scaler_step
from .workspace import Ascent, Workspace, device_of


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization over any torch.optim base optimizer, and the engine of its variants.

    ``base_optimizer``: a torch.optim class (its options as extra keyword arguments) or an instance.
    Per-group options: ``rho``, ``adaptive`` (ASAM, weight ``|w| + adaptive_eta``), ``adaptive_eta``.
    Optimizer-wide: ``sam_eps`` (of the ascent scale and of SSAM's ratio), ``normalize_ascent=False``
    (USAM's ``e = rho * g``), ``renormalize`` (SSAM: the descent gradient rescaled to the ascent
    gradient's norm), ``schedule`` (which steps are SAM steps), ``seed`` (of the random masks; default
    ``torch.initial_seed()``), ``fused`` (None: the fused restore-and-step when the base is SGD/Adam/AdamW
    with options it can honour, else the generic path, the base optimizer's own ``step``; True: require
    it; False: the generic path), ``foreach`` (forwarded to the base optimizer; True: the generic path),
    ``backend`` (None/"auto", "native", "triton", "torch"), ``capturable`` (CUDA graphs: the fused descent,
    the RNG step on the device from construction, no host read in a step; ``state_dict`` refreshes the
    host counter), ``policy`` (a variant's ``policy.Policy``, which then takes the SAM options above that
    are not per group). ``combinations.py`` lists the refused combinations.

    ``param_groups`` and ``state`` are the base optimizer's own objects; ``state_dict`` is the base
    optimizer's plus ``"sam"`` (seed, step, the policy's state). AMP, ``ascent_context`` (DDP's per-worker
    ascent) and micro-batches: docs/usage.md.
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
                 capturable: bool = False, schedule: Schedule | None = None, policy: Policy | None = None,
                 **base_kwargs: Any) -> None:
        check_engine_options(rho, adaptive, adaptive_eta, sam_eps, fused, foreach, capturable, seed)
        policy = resolved_policy(policy, normalize_ascent=normalize_ascent, renormalize=renormalize,
                                 schedule=schedule)
        combinations.check(combinations.combination_of(policy, base_optimizer, fused, foreach, capturable))
        base = make_base(params, base_optimizer, base_kwargs, foreach)
        sam_defaults = {"sam_rho": rho, "sam_adaptive": adaptive, "sam_adaptive_eta": adaptive_eta}
        for group in base.param_groups:
            adopt_group_options(group, base.defaults, sam_defaults)
        super().__init__(base.param_groups, sam_defaults)
        self.base_optimizer = base
        surface.share_base(self)
        self.defaults = {**base.defaults, **self.defaults}
        check_distinct(self.param_groups)
        self.policy = policy
        self.eps = float(sam_eps)
        self.seed = torch.initial_seed() if seed is None else seed  # NOTE: consumes no random numbers
        self.fused, self.foreach, self.backend, self.capturable = fused, foreach, backend, capturable
        self._run = Workspace()
        self._backups = self._run.backups
        self.ascent_context: Callable[[], contextlib.AbstractContextManager] | None = None
        backends.resolve(device_of(self.param_groups), backend)
        if self._descent_kind() is None and capturable:
            raise ValueError(f"capturable=True: {fused_steps.unsupported_reason(base, policy)}")
        self._run.grad_marks = closure_convention.record(self.param_groups)
        if capturable:
            self._rng_step(device_of(self.param_groups))

    # ---------------------------------------------------------------- the SAM policy's options

    normalize_ascent = property(lambda self: self.policy.normalize,
                                lambda self, value: setattr(self.policy, "normalize", value))
    renormalize = property(lambda self: self.policy.renormalize,
                           lambda self, value: setattr(self.policy, "renormalize", value))
    schedule = property(lambda self: self.policy.schedule,
                        lambda self, value: setattr(self.policy, "schedule", value))

    # ------------------------------------------------------------------ torch.optim conventions

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to SAM and its base optimizer (SAM's defaults fill missing options)."""
        if "base_optimizer" in self.__dict__:
            surface.add_param_group(self, param_group)
            return
        super().add_param_group(param_group)  # inside torch.optim.Optimizer.__init__, before the base
        check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"sam": {"seed", "step"}`` and the policy's state."""
        self._check_not_perturbed("state_dict()")
        return surface.state_dict(self, self._run)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a ``state_dict()`` result; a plain base-optimizer state dict also loads (the SAM
        seed and step are then kept). Atomic: on an error the optimizer is exactly as before."""
        self._check_not_perturbed("load_state_dict()")
        surface.load_state_dict(self, self._run, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        # NOTE: torch.optim.Optimizer pickles only defaults, state and param_groups; SAM also needs its
        # base optimizer and options (copy.deepcopy and pickling go through here).
        return dict(self.__dict__)

    @property
    def step_count(self) -> int:
        """SAM iterations taken (skipped ones included), the step the schedules and masks use."""
        return self._run.step

    @property
    def uses_fused_step(self) -> bool:
        """Whether ``second_step`` runs the fully fused restore-and-step (else the generic path)."""
        return self._descent_kind() is not None

    def invalidate_plan(self) -> None:
        """Rebuild the step plan at the next step. Only needed after replacing entries of ``state`` by
        hand; every other change (param groups, parameters' storage, gradients, loaded state) is seen."""
        self._run.invalidate()

    # ------------------------------------------------------------------------- training loops

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step driven by a closure; two forward/backward passes in either convention.

        torch.optim's convention: ``closure`` zeroes the gradients, computes the loss, calls backward and
        returns the loss; it runs twice, at w and at w + e (the first call inside ``ascent_context`` when
        set), and ``step`` returns the loss at w. The popular SAM convention: the loop has already run
        the first forward and backward at w (since the last step or ``zero_grad()``) and the closure only
        computes and backpropagates; those gradients are the ascent's, the closure runs once, at w + e,
        and ``step`` returns None (closure_convention.py tells the two apart). BatchNorm statistics are
        frozen at w + e. Without a closure, after ``first_step()``, ``step()`` is the descent, as
        ``torch.amp.GradScaler.step(optimizer)`` drives it (``grad_scale`` and ``found_inf`` attributes).
        """
        return self._step(closure)

    # NOTE (step hooks): torch.optim wraps a class's ``step`` with its hook runner unless the function is
    # marked ``hooked``; SAM runs the hooks itself (``base.run_step_hooks``) so that every calling style runs
    # each hook exactly once, the pre-hooks before the ascent and the post-hooks after the descent.
    step.hooked = True

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        """The body of ``step``, shared with subclasses."""
        if closure is not None:
            return closure_step(self, self._run, closure)
        scaler_step(self, self._run)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``, recorded for ``step(closure)``; drops a parked micro-batch sum."""
        accumulation.drop_sum(self._run)
        self._run.release()  # NOTE: after an error inside a step the plan may still hold gradients
        super().zero_grad(set_to_none)
        self._run.grad_marks = (closure_convention.CLEARED if set_to_none
                                else closure_convention.record(self.param_groups))

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """The context of the second forward and backward, at w + e: gradients enabled, BatchNorm
        statistics frozen, the weights put back to w if the block raises."""
        with self._restoring_on_error(), torch.enable_grad(), freeze_bn_stats():
            yield

    def needs_second_pass(self) -> bool:
        """After ``first_step``: whether the second forward and backward must run before the descent
        (False on a plain step of a ``schedule``: ``second_step()`` then steps with the first gradients)."""
        if self._run.ascent is None:
            raise RuntimeError("needs_second_pass(): call it after first_step()")
        return not self._run.ascent.plain

    def planned_sam_step(self) -> bool | None:
        """Whether the coming step is a SAM step, when known before its first backward (None: AE-SAM)."""
        return self._planned_sam_step()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Ascent: back up w, then w += e from the current gradients (a no-op on a non-finite gradient).

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled the first loss. Its scale is divided
        out on the device (folded into the norm; with ``normalize_ascent=False`` the gradients are
        unscaled in place); the descent must then go through ``scaler.step(optimizer)``. A disabled
        scaler is ignored.
        """
        scaler = grad_scaler if amp.scaler_enabled(grad_scaler) else None
        if self._run.ascent is not None:
            ascend_further(self, self._run, scaler, zero_grad)  # raises unless one is due
        else:
            if self._run.parked is None:  # NOTE: the pre-hooks run once per step, not per micro-batch
                run_step_hooks(self, "pre")
            ascend(self, self._run, scaler, zero_grad)
        self._run.release()

    def accumulate(self, closure: Callable[[], Any] | None = None, *, grad_scaler: Any = None) -> Any:
        """Micro-batch SAM (m-sharpness, accumulation.py): after the second backward of a micro-batch
        that is not the last, restore w and add its SAM gradient to the sum (the last one ends with the
        descent). With a ``closure`` (loss and backward, never zeroing the gradients): the whole
        micro-batch, both passes; returns the loss at w."""
        if closure is not None:
            return accumulation.micro_batch(self, closure, last=False, grad_scaler=grad_scaler)
        with torch.no_grad():
            accumulation.park(self, self._run)
        return None

    def micro_batch_step(self, closure: Callable[[Any], Any], micro_batches: Iterable) -> Any:
        """One SAM step over ``micro_batches``, each with its own ascent (m-sharpness): ``closure(batch)``
        computes a micro-batch's loss and calls backward; the descent is on the sum of their SAM
        gradients. Returns the sum of the losses at w."""
        return accumulation.micro_batch_step(self, closure, micro_batches)

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
        descent.run(self, self._run, None, None, zero_grad, from_step=False)

    # ------------------------------------------------ for the variants' classes (with _step, _abandon_ascent,
    # _restoring_on_error and _check_not_perturbed below); everything else here is the engine's own

    def _context(self, plan, grads: list, ascent: Ascent | None) -> StepContext:
        """A policy's view of the step (``policy.StepContext``)."""
        return self._run.context(self, plan, grads, ascent)

    def _ascent_pass(self) -> contextlib.AbstractContextManager:
        """The context of the first forward and backward of the steps the engine drives (``ascent.py``)."""
        return ascent_pass(self)

    def _pending_ascent(self) -> bool:
        """Whether the weights are perturbed (an ascent waits for its descent)."""
        return self._run.ascent is not None

    def _one_pass_step(self) -> None:
        """A descent with the current gradients and no second pass (``styles.one_pass_step``)."""
        one_pass_step(self, self._run)

    # ------------------------------------------------------------------------------ internals

    def _planned_sam_step(self) -> bool | None:
        """The policy's decision for this step when known before the first backward, made once."""
        return self._run.planned(self.policy, self.seed)

    def _check_not_perturbed(self, what: str) -> None:
        if self._run.ascent is not None:
            raise RuntimeError(f"{what}: the weights are perturbed between first_step() and "
                               "second_step(); call it after second_step()")

    def _descent_kind(self) -> str | None:
        """``"sgd"``/``"adam"`` for the fully fused descent, None for the generic path."""
        return fused_steps.descent_kind(self.base_optimizer, self.policy, self.fused, self.foreach)

    def _plan(self, may_lack: frozenset[int] = frozenset()):
        """The step plan and the gradients (``Workspace.current_plan``), the groups shared again first."""
        surface.reshare(self)
        return self._run.current_plan(self, self._descent_kind(), may_lack)

    def _params(self) -> list[torch.Tensor]:  # every parameter, in the param groups' order
        return [param for group in self.param_groups for param in group["params"]]

    def _rng_step(self, device: torch.device) -> torch.Tensor:
        return self._run.rng_step(device)

    def _abandon_ascent(self) -> None:
        """Put the weights back to w, forget the ascent (the backups hold w until the next ascent)."""
        ascent, self._run.ascent = self._run.ascent, None
        self._run.release()
        if ascent is not None:
            with torch.no_grad():
                self._run.restore(ascent, self.backend)

    @contextlib.contextmanager
    def _restoring_on_error(self) -> Iterator[None]:
        """If the block raises while the weights are perturbed, put them back to w and re-raise."""
        try:
            yield
        except BaseException:
            self._abandon_ascent()
            raise
