"""SAM under torch.distributed: DDP with a per-worker or a synced ascent, and FSDP2 (``fully_shard``).

DDP (docs/algorithms.md): by default each worker perturbs its own replica with its own gradient. The
first forward and backward run inside ``model.no_sync()`` (``per_worker_ascent``), so no gradient is
all-reduced there; the second backward is the usual synced one, and since every worker restores the same
w and steps with the same all-reduced gradient, the parameters stay identical on every rank. A globally
synced ascent is the plain loop without ``no_sync`` (or ``average_gradients_`` after a per-worker
backward, which also suits ESAM). Every rank must use the same SAM ``seed`` (``broadcast_seed_``), so
that ESAM's dropped tensors and masks agree.

FSDP2 (``fully_shard``): the parameters are DTensor shards. SAM sees that, all-reduces the squared norm
of the local shards over the parameters' mesh (so the ascent is globally synced), perturbs and restores
the local shards in place (no storage swap) and descends with the base optimizer's own step. Clip with
``sam_kernels.clip.clip_grad_norm_(..., process_group=mesh.get_group())``.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: no sharded parameters

    class DTensor:  # type: ignore[no-redef]
        """Placeholder: nothing is an instance."""


__all__ = ["all_reduce_norm", "average_gradients_", "broadcast_seed_", "local_tensor", "per_worker_ascent",
           "shard_group"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else the tensor itself.

    NOTE: the shard is a view of the storage FSDP2 all-gathers from, so writing it in place perturbs
    and restores the parameter without swapping any storage.
    """
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def shard_group(params: Iterable[torch.Tensor]):
    """The process group over which ``params`` are sharded (DTensors of FSDP2, judged by the first one),
    or None for ordinary tensors."""
    for param in params:
        if not isinstance(param, DTensor):
            return None
        mesh = param.device_mesh
        return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
    return None


def all_reduce_norm(norm: torch.Tensor, group, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of a tensor set sharded over ``group``, from each rank's norm of its shards: one
    all-reduce of the ``norm_type``-th powers (of the norms themselves, with MAX, for inf). A collective:
    every rank of ``group`` must call it. Used by SAM's norms of FSDP2 shards and ``clip_grad_norm_``."""
    if math.isinf(norm_type):
        reduced = norm.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        return reduced
    power = norm.pow(norm_type)
    dist.all_reduce(power, group=group)
    return power.pow(1.0 / norm_type)


@contextlib.contextmanager
def per_worker_ascent(model: torch.nn.Module, optimizer=None) -> Iterator[None]:
    """Wrap the first (ascent) forward *and* backward: no gradient all-reduce inside.

    DDP's ``no_sync()`` for a DistributedDataParallel model; a no-op for any other module (a
    single-process run, so the same loop runs everywhere). With ``optimizer`` (a SAM-family optimizer
    with a ``schedule``), plain steps keep the all-reduce: they descend with this first gradient, so it
    must be the synced one on every rank.
    """
    if optimizer is not None:
        planned = optimizer.planned_sam_step()
        if planned is None:
            raise ValueError("per_worker_ascent: the optimizer's schedule decides after the first backward "
                             "(AE-SAM), so its plain steps would descend with unsynced gradients; use a "
                             "globally synced ascent or a host schedule")
        if not planned:
            yield
            return
    no_sync = getattr(model, "no_sync", None)
    with no_sync() if callable(no_sync) else contextlib.nullcontext():
        yield


def broadcast_seed_(optimizer, src: int = 0, group=None) -> int:
    """Give every rank ``src``'s SAM seed (collective; call once after building the optimizer).

    NOTE: the default seed is ``torch.initial_seed()``, which differs between ranks unless each seeds
    torch identically; ESAM's per-tensor drops and the masks must agree across ranks.
    """
    holder = [optimizer.seed]
    dist.broadcast_object_list(holder, src=src, group=group)
    optimizer.seed = int(holder[0])  # ESAM draws its dropped tensors from the seed at each step
    return optimizer.seed


@torch.no_grad()
def average_gradients_(parameters: Iterable[torch.Tensor], group=None) -> None:
    """All-reduce and average the gradients of ``parameters`` over ``group`` (one collective per device
    and dtype, through a flat buffer); parameters without a gradient are skipped, so every rank must
    hold gradients for the same parameters (true for ESAM's dropped tensors under one seed).
    """
    world = dist.get_world_size(group)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            buckets[(p.grad.device, p.grad.dtype)].append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in
                                     zip(flat.split([g.numel() for g in grads]), grads, strict=True)])
