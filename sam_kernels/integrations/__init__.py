"""Integrations with training frameworks that drive the optimizer themselves.

``sam_kernels.integrations.huggingface.SAMTrainer``: a ``transformers.Trainer`` that runs SAM's two
passes (transformers is imported only by that module). PyTorch Lightning needs no integration: its
automatic optimization passes a closure to ``optimizer.step``, which is SAM's closure style.
"""
