"""PyTorch Lightning's fp16 mixed precision for the SAM family.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.plugins.precision import MixedPrecision

from . import unwrap

__all__ = ["SAMMixedPrecision"]


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
        if sam.needs_second_pass():
            with sam.second_pass():
                closure()
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
