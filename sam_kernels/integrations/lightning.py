"""PyTorch Lightning for the SAM family: fp16 mixed precision, and gradient accumulation as micro-batch SAM.

Lightning's ``precision="16-mixed"`` plugin runs the training closure once itself and then calls
``scaler.step(optimizer)`` without it, so a closure-style SAM never gets its second pass (SAM refuses
that step with an error naming this plugin). ``SAMMixedPrecision`` is that plugin with SAM's step:
the closure at w (scaled backward), ``first_step(grad_scaler=scaler)`` (unscaled on the device), the
closure again at w + e when the step is a SAM step (BatchNorm statistics frozen), Lightning's
``on_before_optimizer_step`` hooks, then ``scaler.step(optimizer)`` (SAM's descent, skipped with the
weights restored when either pass overflowed) and ``scaler.update()``::

    trainer = lightning.Trainer(plugins=[SAMMixedPrecision("16-mixed", "cuda")], ...)

Give it instead of ``precision=``. bf16 (``"bf16-mixed"``) needs no scaler and runs Lightning's own
path. Lightning's ``gradient_clip_val`` is refused under a scaler for optimizers that unscale inside
their step (SAM among them); clip inside ``on_before_optimizer_step`` with
``sam_kernels.clip_grad_norm_`` instead, after SAM's unscaling.

``accumulate_grad_batches = k > 1`` is micro-batch SAM (m-sharpness): each micro-batch its own ascent
and second pass, the descent on the sum of their SAM gradients (Lightning divides each loss by k, so the
sum is their mean). Lightning runs the closure of the first k - 1 micro-batches itself, which a two-pass
optimizer cannot follow, unless the strategy handles accumulation; ``MicroBatchSingleDeviceStrategy``
and ``MicroBatchDDPStrategy`` (or ``MicroBatchSAM`` mixed into another strategy) do, calling
``optimizer.accumulate(closure)`` for those micro-batches::

    trainer = lightning.Trainer(accumulate_grad_batches=4, strategy=MicroBatchSingleDeviceStrategy("cpu"))

As with DeepSpeed's accumulation, an epoch's last micro-batches that do not fill a step are dropped by
the next step's ``zero_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from ..optim.styles import remaining_passes
from . import unwrap

__all__ = ["MicroBatchDDPStrategy", "MicroBatchSAM", "MicroBatchSingleDeviceStrategy", "SAMMixedPrecision"]


class SAMMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` plugin whose optimizer step runs SAM's two passes under the
    GradScaler (see the module docstring). Optimizers other than SAM's step as with ``MixedPrecision``."""

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None or not _is_sam(optimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        sam = unwrap(optimizer)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return closure_result  # training_step returned None: Lightning skips the step
        sam.first_step(zero_grad=True, grad_scaler=self.scaler)
        remaining_passes(sam, closure, self.scaler)
        self._after_closure(model, optimizer)
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return step_output


def _is_sam(optimizer: Any) -> bool:
    try:
        unwrap(optimizer)
    except TypeError:
        return False
    return True


class MicroBatchSAM:
    """A Lightning strategy mixin (first base) that handles gradient accumulation for the SAM family: the
    optimizer step of every micro-batch but the last of a step is ``accumulate(closure)`` (both passes;
    under DDP without the gradient sync, which the last micro-batch's backward does for the whole sum);
    the last one steps as usual. Optimizers other than SAM's are refused."""

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        if not _is_sam(optimizer):
            raise TypeError(f"{type(self).__name__}: the optimizer must be a sam_kernels SAM-family "
                            "optimizer")
        trainer = self.lightning_module.trainer
        # NOTE: Lightning's own test of "not the last micro-batch of the step"; with a strategy that
        # handles accumulation every micro-batch's step comes here.
        if not trainer.fit_loop._should_accumulate():
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        sync = getattr(self, "block_backward_sync", contextlib.nullcontext)
        with sync():
            return unwrap(optimizer).accumulate(closure, grad_scaler=getattr(self.precision_plugin, "scaler",
                                                                             None))


class MicroBatchSingleDeviceStrategy(MicroBatchSAM, SingleDeviceStrategy):
    """Lightning's single-device strategy with micro-batch SAM (``MicroBatchSAM``)."""


class MicroBatchDDPStrategy(MicroBatchSAM, DDPStrategy):
    """Lightning's DDP strategy with micro-batch SAM (``MicroBatchSAM``)."""
