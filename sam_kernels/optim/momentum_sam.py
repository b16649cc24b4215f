"""Momentum SAM (Becker et al. 2024, MSAM): no extra pass at all; the weights sit at
``w - rho * v / ||v||`` (``v`` the SGD momentum buffer, or Adam's first moment ``exp_avg``) and the
gradient taken there drives the step (docs/algorithms.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import ops
from ..backends.common import PerturbConfig
from . import combinations
from .base import run_step_hooks
from .policy import Policy, StepContext, policy_options
from .sam import SAM

#: The optimizer state entry each base kind (``fused_steps.class_kind``) perturbs along: torch.optim.SGD's
#: momentum buffer ``v``, torch.optim.Adam's and AdamW's first moment ``m`` (their own state, under torch's
#: own keys, so the direction needs no state of ours and resumes with the base optimizer's state dict).
DIRECTION_KEYS = {"sgd": "momentum_buffer", "adam": "exp_avg"}

#: The learning rate when none is given: MSAM's SGD default (the authors' class), torch.optim's Adam one.
_DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


class MomentumSAMPolicy(Policy):
    """MSAM's ascent: along ``-v`` (SGD's momentum buffers, or Adam's first moments ``m``), taken right
    after each descent for the next step's gradient, instead of along the gradient before it.

    ``base_kind``: ``"sgd"`` or ``"adam"`` (Adam and AdamW), the base optimizer's kind, which names the
    state entry the direction is read from (``DIRECTION_KEYS``) and the fused step whose lists it reuses."""

    name = "MomentumSAM"
    accumulates = False  # NOTE: one pass per step, so no micro-batch has an ascent of its own
    fused_ops = ("sgd", "adam")

    def __init__(self, base_kind: str = "sgd", **options: Any) -> None:
        super().__init__(**options)
        if base_kind not in DIRECTION_KEYS:
            raise ValueError(f"base_kind: 'sgd' or 'adam', got {base_kind!r}")
        self.base_kind = base_kind
        self.direction_key = DIRECTION_KEYS[base_kind]

    def after_step(self, context: StepContext) -> None:
        self.perturb_along_momentum(context)

    def perturb_along_momentum(self, context: StepContext) -> None:
        """w~ = w - rho * d / (||d|| + eps) per group's rho (d: the momentum buffers or first moments,
        ``||d||`` global), the backups = w (nothing before the base optimizer made its state).
        ``context.plan``: the step plan of the fused descent just run, whose lists it reuses; else (the
        generic path, or outside a step) the lists come from the optimizer state."""
        plan = context.plan if context.plan is not None and context.plan.kind == self.base_kind else None
        if plan is not None:
            # NOTE: the fused step's own lists (SgdGroupState.buffers, AdamGroupState.exp_avgs, the very
            # tensors the step just updated and committed to the state), so no per-parameter state
            # lookup on the hot path. A group without directions (SGD momentum set to 0 since) sits out.
            adam = self.base_kind == "adam"
            parts = [(plan.local[g.start:g.stop], directions, plan.backups[g.start:g.stop], g.positions,
                      g.group) for g in plan.groups
                     if (directions := g.state.exp_avgs if adam else g.state.buffers)]
        else:
            parts = _direction_lists(context, self.direction_key)
        directions = [direction for part in parts for direction in part[1]]
        if not directions:
            return
        params = [param for part in parts for param in part[0]]
        norm = ops.grad_norm(params, directions, backend=context.backend)[0]
        eps, seed = context.eps, context.seed
        context.perturb(plan, parts, norm, lambda group: PerturbConfig(
            rho=float(group["sam_rho"]), eps=eps, scale_factor=-1.0, seed=seed))


def _direction_lists(context: StepContext, key: str) -> list[tuple]:
    """(params, directions ``state[p][key]``, backups, global positions, group) of each group, from the
    state."""
    parts, position, state = [], 0, context.state
    for group in context.param_groups:
        held = []
        for param in group["params"]:
            direction = state[param].get(key) if param in state else None
            if direction is not None:
                held.append((param, direction, context.backup(param), position))
            position += 1
        if held:
            parts.append(tuple([item[j] for item in held] for j in range(4)) + (group,))
    return parts


def _base_kind(base_optimizer: Any) -> str:
    """``"sgd"``, ``"adam"`` (Adam, AdamW) or ``"other"`` (refused by the option table) for a class."""
    if not isinstance(base_optimizer, type):
        raise TypeError("base_optimizer: MomentumSAM builds its base optimizer itself; pass the class "
                        "(torch.optim.SGD, Adam or AdamW) with its options as keyword arguments, got "
                        f"{base_optimizer!r}")
    return combinations.base_of(base_optimizer)


def _check_beta1(betas: Any) -> None:
    """Adam's first moment is the direction, so it must average: ``betas[0]`` in (0, 1)."""
    try:
        beta1 = float(betas[0])
    except (TypeError, ValueError, IndexError, RuntimeError):
        raise ValueError(f"betas: expected (beta1, beta2), got {betas!r}") from None
    if not 0 < beta1 < 1:  # NaN fails the comparison too
        raise ValueError(f"betas: MomentumSAM perturbs along Adam's first moment, so betas[0] must be in "
                         f"(0, 1), got {betas[0]!r}")


class MomentumSAM(SAM):
    """Momentum SAM (MSAM): SGD with momentum, or Adam/AdamW, whose gradient is taken at
    ``w - rho * d / ||d||`` (Becker, Altrock, Risse 2024, arXiv 2401.12033; the authors' code
    MarlonBecker/MSAM, ``optimizer/msam.py`` and ``optimizer/adamW_msam.py``).

    ``d`` is the base optimizer's own momentum: SGD's momentum buffer ``v`` (the default,
    ``MomentumSAM(params, lr, momentum=0.9, rho=0.3)``), or with ``base_optimizer=torch.optim.Adam`` or
    ``torch.optim.AdamW`` the first moment ``exp_avg`` (``MomentumSAM(params, lr, rho=...,
    base_optimizer=torch.optim.AdamW, betas=(0.9, 0.999), weight_decay=...)``; its decay is
    ``betas[0]``, so ``momentum`` is refused), taken as the authors' AdamW version takes it: not bias
    corrected, rho not scaled by the learning rate. ``lr`` defaults to 0.1 over SGD, torch's 1e-3 over
    Adam/AdamW.

    One forward and backward per step, like the base optimizer. Between steps the parameters hold the
    perturbed weights ``w~``; ``step()`` moves back to ``w`` (from the backup, bit for bit), takes
    torch's own SGD/Adam/AdamW step with the gradient of ``w~`` (fused when it can run), then perturbs
    again along the new ``d`` (``||d||``: the global norm over every parameter; eps 1e-12). The first
    step (no ``d`` yet) takes its gradient at ``w``.

    Evaluate and save the unperturbed weights inside ``with optimizer.unperturbed():`` (on exit the
    same ``w~`` comes back, bit for bit), or call ``unperturb()`` at the end of training. After loading a
    checkpoint (model first, then this optimizer) call ``perturb()`` before the next forward to resume
    exactly. ``first_step``/``second_step`` do not apply (there is no second pass). GradScaler is not
    supported (use bf16 autocast). The base optimizer's other options (SGD's weight decay, damping,
    Nesterov; Adam's ``eps``, ``weight_decay``, ``amsgrad``, ...) and SAM's (``seed``, ``fused``,
    ``backend``, ...) are keyword arguments.
    """

    def __init__(self, params, lr: float | None = None, *, momentum: float | None = None, rho: float = 0.3,
                 base_optimizer: type = torch.optim.SGD, **kwargs: Any) -> None:
        kind = _base_kind(base_optimizer)
        for name in ("adaptive", "renormalize"):
            if kwargs.get(name):
                raise ValueError(f"{name}: not an option of MomentumSAM")
        if kind == "adam":
            if momentum is not None:
                raise ValueError(f"momentum: not an option of MomentumSAM over {base_optimizer.__name__}, "
                                 "whose first moment decays by betas[0]; pass betas=(beta1, beta2) instead")
            _check_beta1(kwargs.get("betas", (0.9, 0.999)))
            base_kwargs = {}
        else:
            momentum = 0.9 if momentum is None else momentum
            if (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                    or not 0 < momentum < 1):
                raise ValueError(f"momentum: MomentumSAM perturbs along the momentum buffer, so it must "
                                 f"be in (0, 1), got {momentum!r}")
            if kind == "sgd" and "betas" in kwargs:
                raise TypeError("betas: an option of Adam and AdamW, not of SGD; pass "
                                "base_optimizer=torch.optim.AdamW (or Adam) with it")
            base_kwargs = {"momentum": momentum}
        lr = _DEFAULT_LR.get(kind, 0.1) if lr is None else lr
        policy = MomentumSAMPolicy(kind if kind in DIRECTION_KEYS else "sgd", **policy_options(kwargs))
        super().__init__(params, base_optimizer, rho=rho, policy=policy, lr=lr, **base_kwargs, **kwargs)

    # ------------------------------------------------------------------------- training loops

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MSAM step; ``closure`` (optional) zeroes the gradients, computes the loss at the current
        (perturbed) weights and calls backward; it runs once."""
        if hasattr(self, "grad_scale") or hasattr(self, "found_inf"):
            combinations.check(combinations.combination_of(self.policy, self.base_optimizer, self.fused,
                                                           self.foreach, self.capturable, amp=True))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            run_step_hooks(self, "pre")
            self._one_pass_step()
        return loss

    step.hooked = True  # NOTE (step hooks): SAM runs the hooks itself; see SAM.step

    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        raise RuntimeError("first_step(): MomentumSAM takes one pass per step: backward, then step()")

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("second_step(): MomentumSAM takes one pass per step: backward, then step()")

    def needs_second_pass(self) -> bool:
        return False

    def accumulate(self, closure=None, *, grad_scaler: Any = None) -> Any:
        # NOTE: refused before anything moves: the weights stay at w~, MomentumSAM's pending perturbation.
        raise RuntimeError("accumulate(): MomentumSAM takes one pass per step, so its micro-batches have no "
                           "ascent of their own; accumulate the gradients as for plain SGD, then step()")

    def micro_batch_step(self, closure, micro_batches) -> Any:
        return self.accumulate()

    # ---------------------------------------------------------------- unperturbed weights

    def unperturb(self) -> None:
        """Put the weights back to the unperturbed ``w`` (bit for bit); the next step takes its
        gradient there (call ``perturb()`` first to continue exactly)."""
        self._abandon_ascent()

    def perturb(self) -> None:
        """Move to ``w~ = w - rho * d / ||d||`` now (``d``: the momentum buffers or first moments; a no-op
        when already there): after loading a checkpoint, or after ``unperturb()``."""
        if not self._pending_ascent():
            with torch.no_grad():
                self.policy.perturb_along_momentum(self._context(None, None, None))

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside: the unperturbed weights (evaluate, save); at exit the same perturbation again."""
        was_perturbed = self._pending_ascent()
        self.unperturb()
        try:
            yield
        finally:
            if was_perturbed:
                self.perturb()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load (the weights are first put back to ``w``); call ``perturb()`` before the next forward."""
        self.unperturb()
        super().load_state_dict(state_dict)

    def _check_not_perturbed(self, what: str) -> None:
        # NOTE: state_dict() may run while the weights are perturbed: the optimizer state (the momentum
        # or first moment) is the same either way, and the weights are saved unperturbed inside unperturbed().
        return None
