"""Integrations with training frameworks that drive the optimizer themselves.

- ``unwrap(optimizer)``: the SAM-family optimizer under a framework's optimizer wrapper (accelerate's
  ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), for the two-call style's
  ``first_step``; the wrapper's own ``step()`` then runs SAM's descent.
- ``sam_kernels.integrations.huggingface.SAMTrainer``: a ``transformers.Trainer`` that runs SAM's two
  passes (transformers is imported only by that module).
- ``sam_kernels.integrations.lightning.SAMMixedPrecision``: Lightning's fp16 precision plugin for SAM
  (Lightning is imported only by that module). Lightning's fp32 and bf16 need nothing: automatic
  optimization passes a closure to ``optimizer.step``, which is SAM's closure style.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap"]


def unwrap(optimizer: Any):
    """The SAM-family optimizer ``optimizer`` is or wraps.

    Follows the ``optimizer`` attribute that framework wrappers expose (accelerate's
    ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer.optimizer``), however deep.
    """
    from ..optim import SAM  # NOTE: imported here; sam_kernels.optim imports nothing from this package

    seen = optimizer
    for _ in range(16):  # wrappers nest a few levels at most; a cycle must not hang
        if isinstance(seen, SAM):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(f"unwrap: {type(optimizer).__name__} is not a sam_kernels SAM-family optimizer and "
                    "wraps none under .optimizer; build the optimizer as SAM(model.parameters(), "
                    "torch.optim.SGD, ...) before handing it to the framework")
