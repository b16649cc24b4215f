"""A Hugging Face ``transformers.Trainer`` for the SAM family.

The Trainer calls ``optimizer.step()`` without a closure after its own backward, so a two-pass
optimizer needs the training step overridden: ``SAMTrainer.training_step`` runs the first forward and
backward (the Trainer's own), ``first_step``, and, when the step is a SAM step, the second forward and
backward at w + e. The Trainer then clips the gradients (after the second pass, where clipping belongs),
calls ``optimizer.step()`` (SAM's descent), steps its LR scheduler and zeroes the gradients. fp16 goes
through the Trainer's GradScaler (``first_step(grad_scaler=...)``, then ``scaler.step``); bf16 and fp32
need nothing more. Checkpoints are the Trainer's own (SAM's state dict includes its seed and step).

    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=5e-5)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()

With ``gradient_accumulation_steps = k > 1`` each micro-batch takes its own ascent and second pass, and
the descent is on the sum of their SAM gradients (micro-batch SAM, m-sharpness: the Trainer scales each
micro-batch's loss for the accumulation, so the sum is their mean): every micro-batch but the last of a
step ends with ``accumulate()`` (w restored, its SAM gradient added to the sum held in ``.grad``), the last
with the Trainer's ``optimizer.step()``. Multi-step ascents (``MultiStepSAM``) run each further pass too.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from ..optim import SAM
from ..optim.styles import remaining_passes
from . import unwrap

__all__ = ["SAMTrainer"]


class SAMTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose training step runs SAM's two passes (see the module docstring).
    The optimizer must be a ``sam_kernels`` SAM-family optimizer, given as ``optimizers=(opt, None)``
    (or built by an overridden ``create_optimizer``)."""

    def sam_optimizer(self) -> SAM:
        """The SAM-family optimizer under the Trainer's wrappers (accelerate's)."""
        try:
            return unwrap(self.optimizer)
        except TypeError:
            raise TypeError("SAMTrainer: the optimizer must be a sam_kernels SAM-family optimizer; pass "
                            "optimizers=(SAM(model.parameters(), torch.optim.AdamW, ...), None)") from None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        sam = self.sam_optimizer()
        loss = super().training_step(model, inputs, num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)
        sam.first_step(zero_grad=True, grad_scaler=scaler)
        # NOTE: the passes at w + e (each further ascent step's too) run in second_pass(), so an error
        # there puts the weights back to w before it propagates.
        parent = super()
        remaining_passes(sam, lambda: parent.training_step(model, inputs, num_items_in_batch), scaler)
        if not self.accelerator.sync_gradients:
            # NOTE (m-sharpness): not the last micro-batch of the step (the Trainer sets the flag before
            # each one): w back, this micro-batch's SAM gradient joins the sum.
            sam.accumulate()
        return loss
