"""Freezing BatchNorm running statistics during SAM's extra forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook


@contextlib.contextmanager
def freeze_bn_stats(module: nn.Module | None = None) -> Iterator[None]:
    """Inside the block, BatchNorm layers in training mode normalize with batch statistics as usual but
    leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched, bit for bit.

    With ``module`` the BatchNorm layers of that module are frozen; with ``None`` every BatchNorm layer
    that runs inside the block is (through a global forward pre-hook, removed on exit), so callers that
    do not know the model, such as ``SAM.step(closure)``, can use it. SyncBatchNorm is covered.

    NOTE: the layers get ``track_running_stats = False`` for the duration of the block. In training mode
    that makes ``_BatchNorm.forward`` pass no running buffers to ``F.batch_norm`` (nothing to update)
    and skip the ``num_batches_tracked`` increment, while still normalizing with the batch statistics,
    exactly as the unfrozen layer does. Evaluation-mode layers read their buffers and are left alone.
    Every layer touched is switched back on exit, even when the block raises.
    """
    frozen: list[_BatchNorm] = []

    def freeze(layer: nn.Module) -> None:
        if isinstance(layer, _BatchNorm) and layer.training and layer.track_running_stats:
            layer.track_running_stats = False
            frozen.append(layer)

    handle = None
    if module is None:
        handle = register_module_forward_pre_hook(lambda layer, _args: freeze(layer))
    else:
        for layer in module.modules():
            freeze(layer)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for layer in frozen:
            layer.track_running_stats = True
