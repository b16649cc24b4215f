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

Gradient accumulation over several micro-batches is refused: SAM's ascent needs the whole batch's
gradient before the second pass, which the Trainer's accumulation loop cannot provide.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from ..optim import SAM
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
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps: SAMTrainer needs 1 (SAM's ascent needs the "
                             "whole batch's gradient before its second pass); raise the batch size instead")
        sam = self.sam_optimizer()
        loss = super().training_step(model, inputs, num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)
        sam.first_step(zero_grad=True, grad_scaler=scaler)
        if sam.needs_second_pass():
            # NOTE: an error in the second pass puts the weights back to w before it propagates.
            with sam.second_pass():
                super().training_step(model, inputs, num_items_in_batch)
        return loss
