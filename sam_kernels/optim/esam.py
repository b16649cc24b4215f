"""ESAM (Du et al. 2022): SAM made cheaper by stochastic weight perturbation (SWP) and
sharpness-sensitive data selection (SDS), with the official code's semantics (docs/algorithms.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from ..backends.common import U32, mask_threshold, split_u64
from ..backends.reference import philox4x32_10
from . import amp
from .ascent import excluded, exclusion_pass
from .checks import check_probability
from .policy import Policy, policy_options
from .sam import SAM

#: Philox "tensor index" of the per-tensor SWP draw. NOTE: parameter positions are below 2**32 - 1, so
#: the per-tensor stream never coincides with the elementwise mask of a parameter (same seed and step).
SWP_TENSOR_STREAM = 2**32 - 1

#: Steps of per-tensor draws made in one call (see ``ESAM._swp_keep``).
SWP_BLOCK = 64

SampleLosses = Callable[[torch.Tensor | None], torch.Tensor]


def selected_count(gamma: float, batch_size: int) -> int:
    """Number of samples SDS keeps: ``round(gamma * batch_size)``, halves rounded up, at least one.

    The official code keeps the samples strictly sharper than the k-th sharpest, ``k - 1`` of them (fewer
    on ties); here exactly k are kept.
    """
    return min(batch_size, max(1, math.floor(gamma * batch_size + 0.5)))


def _select(batch, indices: torch.Tensor):
    if isinstance(batch, torch.Tensor):
        return batch.index_select(0, indices.to(batch.device))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_select(item, indices) for item in batch)
    if isinstance(batch, dict):
        return {key: _select(value, indices) for key, value in batch.items()}
    raise TypeError(f"inputs/targets: expected tensors (or tuples, lists, dicts of them), got "
                    f"{type(batch).__name__}")


def sample_losses_closure(model: Callable, inputs, targets,
                          loss_fn: Callable[[Any, Any], torch.Tensor]) -> SampleLosses:
    """The ``sample_losses`` argument of ``ESAM.sds_step`` for a plain supervised batch.

    ``loss_fn(model(inputs), targets)`` must return one loss per sample (``reduction="none"``). Inputs and
    targets are tensors, or tuples, lists or dicts of tensors, indexed along their first dimension.
    """
    def sample_losses(indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            return loss_fn(model(inputs), targets)
        return loss_fn(model(_select(inputs, indices)), _select(targets, indices))

    return sample_losses


def _per_sample(losses: Any, expected: int | None = None) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"sample_losses: must return one loss per sample (a 1-d tensor, e.g. from "
                         f"reduction='none'), got {shape}")
    if expected is not None and losses.numel() != expected:
        raise ValueError(f"sample_losses: returned {losses.numel()} losses for {expected} samples")
    return losses


class ESAMPolicy(Policy):
    """ESAM's ascent: per-tensor SWP drops tensors from the ascent (``excluded``), elementwise SWP masks
    it; both scale the kept perturbation by ``1 / beta``. SAM's options (``normalize``, ``renormalize``,
    a host ``schedule``) apply as for SAM."""

    accumulates = False  # NOTE: its data selection and SWP are defined over the whole batch

    name = "ESAM"

    def __init__(self, beta: float = 0.6, swp: str = "tensor", **options: Any) -> None:
        check_probability("beta", beta)
        if swp not in ("tensor", "element"):
            raise ValueError(f"swp: must be 'tensor' or 'element', got {swp!r}")
        super().__init__(**options)
        self.beta = float(beta)
        self.swp = swp
        self._swp_block: tuple | None = None

    @property
    def drops_tensors(self) -> bool:
        return self.swp == "tensor" and self.beta < 1.0

    def ascent_mask(self, group: dict) -> tuple[float, float]:
        # NOTE (scale factor): per-tensor SWP masks nothing elementwise (the dropped tensors sit out
        # the call), element SWP masks at beta; both scale the kept perturbation by 1 / beta.
        return 1.0 if self.swp == "tensor" else self.beta, 1.0 / self.beta

    def excluded(self, params: list[torch.Tensor], step: int, seed: int) -> list[torch.Tensor]:
        """The tensors per-tensor SWP drops from this step's ascent.

        NOTE (draw rule): tensor t of the global parameter order is kept iff element t of the mask
        contract's stream (backends/common.py) with tensor index ``SWP_TENSOR_STREAM``, this optimizer's
        seed and the current RNG step is kept at probability beta: a function of (seed, step) only, so a
        resumed run and every DDP rank draw the same tensors. Only tensors that require grad take part
        (user-frozen ones stay as they are). If every one would be dropped, the one at position
        ``step % count`` of them is kept, so that the ascent backward has something to differentiate.
        """
        if not self.drops_tensors:
            return []
        eligible = [i for i, param in enumerate(params) if param.requires_grad]
        if not eligible:
            return []
        keep = self._swp_keep(len(params), step, seed)
        dropped = [i for i in eligible if not keep[i]]
        if len(dropped) == len(eligible):
            dropped.remove(eligible[step % len(eligible)])
        return [params[i] for i in dropped]

    def _swp_keep(self, count: int, step: int, seed: int) -> list[bool]:
        """Row ``step`` of the per-tensor keep draws (the rule of ``excluded``).

        NOTE (draw block): the Philox reference costs about a hundred small torch ops per call whatever
        the tensor count, so the draws of ``SWP_BLOCK`` consecutive steps are made in one call and kept;
        a new seed, beta or tensor count, or a step outside the block, draws a new block.
        """
        key = (seed, count, self.beta)
        cached = self._swp_block
        if cached is None or cached[0] != key or not cached[1] <= step < cached[1] + SWP_BLOCK:
            steps = torch.arange(step, step + SWP_BLOCK, dtype=torch.int64).unsqueeze(1)
            elements = torch.arange(count, dtype=torch.int64)
            word0 = philox4x32_10((elements, SWP_TENSOR_STREAM, steps & U32, steps >> 32),
                                  split_u64(seed))[0]
            rows = ((word0 >> 8) < mask_threshold(self.beta)).tolist()
            cached = self._swp_block = (key, step, rows)
        return cached[2][step - cached[1]]


class ESAM(SAM):
    """Efficient SAM: SWP keeps each parameter tensor in the ascent with probability ``beta``; SDS runs
    the descent on the ``gamma`` fraction of the batch with the largest sharpness.

    ``swp="tensor"`` (the official semantics): every tensor is independently dropped from the ascent with
    probability ``1 - beta`` (a draw from the seed and step, ``dropped_tensors``); the norm covers the
    kept tensors and the scale is ``rho / (||g|| + eps) / beta``. Inside ``ascent_pass()`` (which
    ``step(closure)`` and ``sds_step`` wrap around the first forward and backward) the dropped tensors'
    ``requires_grad`` is off, so autograd skips their weight-gradient work; outside it every flag is the
    user's own. ``swp="element"``: an elementwise Bernoulli(beta) mask scaled by ``1 / beta`` (same
    expected perturbation, no compute saved).

    SDS needs per-sample losses: use ``sds_step``. ``step(closure)`` and the two-call loop run SWP only
    and need ``gamma=1``. With ``beta = gamma = 1`` ESAM is SAM.
    """

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, beta: float = 0.6,
                 gamma: float = 0.5, swp: str = "tensor", **kwargs: Any) -> None:
        policy = ESAMPolicy(beta, swp, **policy_options(kwargs))
        check_probability("gamma", gamma)
        self.gamma = float(gamma)
        self._selecting = False
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)

    beta = property(lambda self: self.policy.beta, lambda self, value: setattr(self.policy, "beta", value))
    swp = property(lambda self: self.policy.swp, lambda self, value: setattr(self.policy, "swp", value))

    @property
    def dropped_tensors(self) -> tuple[torch.Tensor, ...]:
        """The parameter tensors that per-tensor SWP leaves out of the next ascent."""
        return tuple(excluded(self))

    def ascent_pass(self) -> contextlib.AbstractContextManager:
        """Wrap the first (ascent) forward and backward: the dropped tensors' ``requires_grad`` is off
        inside, so autograd skips their weight gradients, and back on at exit (even on an error).

        ``step(closure)`` and ``sds_step`` use it; a two-call loop may wrap its first forward and
        backward in it to save the same compute (without it the dropped tensors' gradients are computed
        and left unused). User-frozen tensors are never touched.
        """
        return exclusion_pass(self)

    # ------------------------------------------------------------------------- training loops

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """SAM's closure step with SWP; SDS needs per-sample losses, so this requires ``gamma == 1``."""
        if self.gamma != 1.0 and closure is not None:
            raise ValueError(f"gamma={self.gamma}: data selection needs per-sample losses; use "
                             "sds_step(sample_losses), or gamma=1 to run step(closure) with SWP only")
        return self._step(closure)

    step.hooked = True  # NOTE (step hooks): SAM runs the hooks itself; see SAM.step

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """SAM's ascent with SWP. Outside ``sds_step`` this requires ``gamma == 1`` (the two-call loop's
        second backward is the user's, so no data selection can happen)."""
        if self.gamma != 1.0 and not self._selecting:
            raise ValueError(f"gamma={self.gamma}: the two-call loop cannot select data (the second "
                             "backward is yours); use sds_step(sample_losses) for SDS, or gamma=1 for "
                             "SWP only")
        super().first_step(zero_grad, grad_scaler=grad_scaler)

    def sds_step(self, sample_losses: SampleLosses, *, grad_scaler: Any = None) -> torch.Tensor:
        """One ESAM step with SWP and SDS; returns the mean loss at w.

        ``sample_losses(indices)`` computes the per-sample losses (forward only: no backward, no
        ``zero_grad``) of the whole batch when ``indices`` is None, else of the samples at ``indices``
        (a 1-d int64 tensor); ``sample_losses_closure`` builds one from a model, a batch and a loss.
        The first forward and backward run inside ``ascent_context`` (when set) and ``ascent_pass``.
        Passes: full batch at w (ascent backward, the only pass that updates BatchNorm statistics), a
        no-grad full batch at w + e, and the selected samples at w + e (descent backward). The no-grad
        pass is skipped when every sample is selected.

        ``grad_scaler``: a ``torch.amp.GradScaler`` scales both backward passes, the ascent unscales
        inside ``first_step`` and the descent runs as ``grad_scaler.step(self)``; call
        ``grad_scaler.update()`` afterwards.
        """
        scaler = grad_scaler if amp.scaler_enabled(grad_scaler) else None

        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        with torch.enable_grad(), self._ascent_pass():
            self.zero_grad()
            before = _per_sample(sample_losses(None))
            backward(before.mean())
        before = before.detach()
        self._selecting = True
        try:
            self.first_step(zero_grad=True, grad_scaler=scaler)
        finally:
            self._selecting = False
        if not self.needs_second_pass():  # a plain step of a schedule: the first gradients descend
            if scaler is not None:
                scaler.step(self)
            else:
                self.second_step()
            return before.mean()
        indices = None
        with self.second_pass():  # BatchNorm frozen, the weights back to w if the block raises
            if selected_count(self.gamma, before.numel()) < before.numel():
                with torch.no_grad():
                    after = _per_sample(sample_losses(None), before.numel())
                indices = self.select_samples(before, after)
            expected = before.numel() if indices is None else indices.numel()
            backward(_per_sample(sample_losses(indices), expected).mean())
        if scaler is not None:
            scaler.step(self)
        else:
            self.second_step()
        return before.mean()

    def select_samples(self, loss_before: torch.Tensor, loss_after: torch.Tensor) -> torch.Tensor:
        """Indices (ascending) of the ``selected_count(gamma, batch)`` samples with the largest sharpness
        ``loss_after - loss_before``; computed on the device without a host sync.
        """
        sharpness = (loss_after.detach() - loss_before.detach()).reshape(-1)
        count = selected_count(self.gamma, sharpness.numel())
        return torch.topk(sharpness, count, sorted=False).indices.sort().values
