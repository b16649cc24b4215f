"""The worker processes of the distributed tests (imported by name in spawned processes)."""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from eager_reference import batch_loss, make_batches, make_mlp
from torch.nn.parallel import DistributedDataParallel

from sam_kernels.clip import clip_grad_norm_
from sam_kernels.distributed import average_gradients_, broadcast_seed_, per_worker_ascent
from sam_kernels.optim import ESAM, SAM, Interval, sample_losses_closure

WORLD = 2
RHO = 0.05
LR = 0.1
STEPS = 3


def init(rank: int, port: int) -> None:
    faulthandler.enable()  # a crash in native code prints the Python stack of every thread
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def finish() -> None:
    """Leave once every rank is done, skipping the interpreter's teardown.

    NOTE (teardown): gloo's worker threads can outlive ``destroy_process_group`` and abort the process
    while the interpreter finalizes ("terminate called without an active exception"), after the results
    were saved. Exiting with ``os._exit`` once both ranks passed the barrier keeps such a teardown crash
    from failing a run whose results are complete; a crash before the barrier still fails the test."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shard(x: torch.Tensor, y: torch.Tensor, rank: int):
    return x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


def gathered(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Every rank's parameters (on every rank)."""
    mine = [p.detach().clone() for p in model.parameters()]
    result: list = [None] * WORLD
    dist.all_gather_object(result, mine)
    return result


def run(rank: int, port: int, ddp_out: str, fsdp_out: str | None, backends: list[str]) -> None:
    """Both runs in one pair of processes (one start-up): DDP's, then FSDP2's unless ``fsdp_out`` is
    None; each saves its results from rank 0."""
    init(rank, port)
    ddp_run(rank, ddp_out, backends)
    if fsdp_out is not None:
        fsdp_run(rank, fsdp_out, backends)
    finish()


def ddp_run(rank: int, out: str, backends: list[str]) -> None:
    results = {}
    for backend in backends:
        for mode in ("per_worker", "per_worker_closure", "synced", "averaged", "interval_per_worker",
                     "interval_closure"):
            model = DistributedDataParallel(make_mlp())
            # NOTE: the interval modes alternate SAM steps with plain ones, which must descend with the
            # synced first gradient although the SAM steps' ascent is per worker.
            schedule = Interval(2) if mode.startswith("interval") else None
            sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9,
                      backend=backend, seed=rank + 11, schedule=schedule)
            broadcast_seed_(sam)
            for x, y in make_batches(STEPS, size=16):
                xs, ys = shard(x, y, rank)
                if mode in ("per_worker_closure", "interval_closure"):
                    sam.ascent_context = model.no_sync

                    def closure(xs=xs, ys=ys, sam=sam, model=model):
                        sam.zero_grad()
                        loss = batch_loss(model, xs, ys)
                        loss.backward()
                        return loss
                    sam.step(closure)
                    continue
                context = per_worker_ascent(model) if mode in ("per_worker", "averaged") else None
                if mode == "interval_per_worker":
                    context = per_worker_ascent(model, sam)
                with context or torch.enable_grad():
                    batch_loss(model, xs, ys).backward()
                if mode == "averaged":
                    average_gradients_(model.parameters())
                sam.first_step(zero_grad=True)
                if sam.needs_second_pass():
                    batch_loss(model, xs, ys).backward()
                sam.second_step(zero_grad=True)
            results[(backend, mode)] = gathered(model)
        results[(backend, "micro_batches")] = micro_batch_run(backend, rank)
        # ESAM: per-tensor SWP toggles requires_grad inside its ascent pass and SDS selects local
        # samples; DDP's reducer must not notice (per-worker ascent, the descent uses every parameter).
        # Built before or after wrapping the model in DDP (accelerate builds the optimizer first).
        for order in ("ddp_first", "esam_first"):
            module = make_mlp()
            if order == "esam_first":
                esam = ESAM(module.parameters(), torch.optim.SGD, rho=RHO, beta=0.5, gamma=0.5, lr=LR,
                            backend=backend, seed=rank + 5)
                model = DistributedDataParallel(module)
            else:
                model = DistributedDataParallel(module)
                esam = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=0.5, gamma=0.5, lr=LR,
                            backend=backend, seed=rank + 5)
            broadcast_seed_(esam)
            esam.ascent_context = model.no_sync
            dropped = []
            for x, y in make_batches(STEPS, size=16):
                dropped.append([i for i, p in enumerate(model.parameters())
                                if any(p is d for d in esam.dropped_tensors)])
                xs, ys = shard(x, y, rank)
                esam.sds_step(sample_losses_closure(model, xs, ys,
                                                    torch.nn.CrossEntropyLoss(reduction="none")))
            key = "esam" if order == "ddp_first" else "esam_built_first"
            results[(backend, key)] = gathered(model)
            everyone: list = [None] * WORLD
            dist.all_gather_object(everyone, dropped)
            results[(backend, f"{key}_dropped")] = everyone
    if rank == 0:
        torch.save(results, out)


def micro_batch_run(backend: str, rank: int) -> list[list[torch.Tensor]]:
    """Micro-batch SAM under DDP, the documented recipe: each rank's shard in two micro-batches (each
    loss halved), the first one's passes under ``no_sync`` and ended by ``accumulate()``, the last one's
    synced (its backward reduces the whole sum)."""
    model = DistributedDataParallel(make_mlp())
    sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, backend=backend)
    for x, y in make_batches(STEPS, size=16):
        micro = list(zip(*(part.chunk(2) for part in shard(x, y, rank)), strict=True))
        sam.zero_grad()
        with model.no_sync():
            (batch_loss(model, *micro[0]) / 2).backward()
            sam.first_step(zero_grad=True)
            with sam.second_pass():
                (batch_loss(model, *micro[0]) / 2).backward()
        sam.accumulate()
        (batch_loss(model, *micro[1]) / 2).backward()
        sam.first_step(zero_grad=True)
        with sam.second_pass():
            (batch_loss(model, *micro[1]) / 2).backward()
        sam.second_step(zero_grad=True)
    return gathered(model)


def fsdp_run(rank: int, out: str, backends: list[str]) -> None:
    """FSDP2 (fully_shard) on a 1-D mesh of the 2 CPU processes: SAM with a globally synced ascent."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for backend, clip in [(backend, None) for backend in backends] + [(backends[0], 0.05)]:
        model = make_mlp()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, backend=backend,
                  seed=3)
        storages = [p._local_tensor.untyped_storage().data_ptr() for p in model.parameters()]
        for x, y in make_batches(STEPS, size=16):
            xs, ys = shard(x, y, rank)
            batch_loss(model, xs, ys).backward()
            sam.first_step(zero_grad=True)
            batch_loss(model, xs, ys).backward()
            if clip is not None:
                clip_grad_norm_(model.parameters(), clip, process_group=mesh.get_group(), backend=backend)
            sam.second_step(zero_grad=True)
        same_storage = storages == [p._local_tensor.untyped_storage().data_ptr()
                                    for p in model.parameters()]
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        key = backend if clip is None else f"{backend}_clip"
        results[key] = {"params": full, "same_storage": same_storage, "fused": sam.uses_fused_step}
    everyone: list = [None] * WORLD
    dist.all_gather_object(everyone, results)
    if rank == 0:
        torch.save(everyone, out)
