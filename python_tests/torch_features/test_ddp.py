"""DDP with 2 processes on the CPU (gloo, 127.0.0.1 only), compared with a single-process run on the same
global batch: the per-worker ascent, the synced ascent, and ESAM's SWP and SDS under DDP's reducer."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from eager_reference import ReferenceSAM, base_step, batch_loss, make_batches, make_mlp, per_worker_step
from targets import require
from tolerance import assert_bitwise_equal, assert_close

HERE = Path(__file__).parent
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(function_name: str, *args) -> None:
    """Run ``dist_worker.<function_name>(rank, port, *args)`` on 2 processes; fail after TIMEOUT_S."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    # NOTE (spawn): the workers import dist_worker (here) and eager_reference (python_tests) by name; spawned
    # processes start with this process's sys.path.
    for folder in (HERE.parent, HERE):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import dist_worker
    context = mp.start_processes(getattr(dist_worker, function_name), args=(free_port(), *args),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{function_name}: the 2 processes did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


def distributed_backends() -> list[str]:
    """The op backends the workers run: the reference and the Triton kernels (the distributed logic is the
    optimizer's, the same over any backend)."""
    require("triton")
    return ["torch", "triton"]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """The DDP and the FSDP2 runs, made by one pair of processes: {"ddp": results, "fsdp": results of each
    rank, or None without FSDP2}, and the backends."""
    backends = distributed_backends()
    folder = tmp_path_factory.mktemp("distributed")
    ddp_out, fsdp_out = folder / "ddp.pt", folder / "fsdp.pt"
    with_fsdp = importlib.util.find_spec("torch.distributed.fsdp") is not None
    spawn("run", str(ddp_out), str(fsdp_out) if with_fsdp else None, backends)
    results = {"ddp": torch.load(ddp_out, weights_only=False),
               "fsdp": torch.load(fsdp_out, weights_only=False) if with_fsdp else None}
    return results, backends


@pytest.fixture(scope="module")
def ddp_results(distributed_results):
    results, backends = distributed_results
    return results["ddp"], backends


def expected_params(mode: str, clip: float | None = None) -> list[torch.Tensor]:
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager = ReferenceSAM.of_model(model, base, rho=0.05)
    for step, (x, y) in enumerate(make_batches(3, size=16)):
        if mode == "interval" and step % 2 == 1:  # a plain step with the full batch's (synced) gradient
            base.zero_grad()
            batch_loss(model, x, y).backward()
            base.step()
            base.zero_grad()
        elif mode == "synced":
            eager.step([(x, y)], clip=clip)
        else:
            per_worker_step(model, base, list(zip(x.chunk(2), y.chunk(2), strict=True)), rho=0.05)
    return [p.detach() for p in model.parameters()]


MODES = {"per_worker": "per_worker", "per_worker_closure": "per_worker", "synced": "synced",
         "averaged": "synced", "interval_per_worker": "interval", "interval_closure": "interval"}


@pytest.mark.slow  # NOTE (test time): two spawned processes
@pytest.mark.parametrize("mode", MODES)
def test_ddp_matches_single_process(ddp_results, mode):
    results, backends = ddp_results
    expected = expected_params(MODES[mode])
    for backend in backends:
        rank0, rank1 = results[(backend, mode)]
        assert_bitwise_equal(rank0, rank1, f"{backend}/{mode}: ranks differ")
        assert_close(rank0, expected, scale=10, msg=f"{backend}/{mode}")


def test_per_worker_differs_from_synced():
    """The two ascents are different algorithms on this data (so the comparisons above can fail)."""
    a, b = expected_params("per_worker"), expected_params("synced")
    assert any((x - y).abs().max() > 1e-4 for x, y in zip(a, b, strict=True))


def expected_micro_batches() -> list[torch.Tensor]:
    """dist_worker.micro_batch_run simulated in one process: per rank two micro-batches of its shard,
    losses halved; the first micro-batch's ascent per worker (under no_sync), the second's from the
    ranks' averaged gradient (synced); the descent on the ranks' average of their summed SAM gradients."""
    model = make_mlp()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def grads_at(offsets, x, y):
        with torch.no_grad():
            for p, e in zip(params, offsets, strict=True):
                p.add_(e)
        model.zero_grad()
        (batch_loss(model, x, y) / 2).backward()
        with torch.no_grad():
            for p, e in zip(params, offsets, strict=True):
                p.sub_(e)
        return [p.grad.detach().clone().double() for p in params]

    def ascent(g):
        norm = sum(float((t * t).sum()) for t in g) ** 0.5
        return [(t * (0.05 / (norm + 1e-12))).float() for t in g]

    zero = [torch.zeros_like(p) for p in params]
    for x, y in make_batches(3, size=16):
        ranks = [list(zip(*(part.chunk(2) for part in (x.chunk(2)[r], y.chunk(2)[r])), strict=True))
                 for r in range(2)]
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for micro in ranks:  # the first micro-batch: each rank's own ascent
            e = ascent(grads_at(zero, *micro[0]))
            total = [t + s / 2 for t, s in zip(total, grads_at(e, *micro[0]), strict=True)]
        firsts = [grads_at(zero, *micro[1]) for micro in ranks]
        e = ascent([(a + b) / 2 for a, b in zip(*firsts, strict=True)])  # the synced ascent
        for micro in ranks:
            total = [t + s / 2 for t, s in zip(total, grads_at(e, *micro[1]), strict=True)]
        base_step(base, params, [t.float() for t in total])
    return [p.detach() for p in params]


@pytest.mark.slow  # NOTE (test time): two spawned processes
def test_ddp_micro_batches(ddp_results):
    """Micro-batch SAM under DDP (no_sync on all but the last micro-batch): ranks identical and equal to
    the one-process simulation."""
    results, backends = ddp_results
    expected = expected_micro_batches()
    for backend in backends:
        rank0, rank1 = results[(backend, "micro_batches")]
        assert_bitwise_equal(rank0, rank1, f"{backend}: ranks differ")
        assert_close(rank0, expected, scale=10, msg=f"{backend}/micro_batches")


@pytest.mark.slow  # NOTE (test time): two spawned processes
def test_ddp_esam(ddp_results):
    """ESAM under DDP (SWP toggles requires_grad, SDS selects per rank, DDP's reducer must not notice):
    ranks identical, the same tensors dropped on both, and equal to a single-process simulation of the
    per-worker ascent with those drops."""
    results, backends = ddp_results
    for backend in backends:
        rank0, rank1 = results[(backend, "esam")]
        assert_bitwise_equal(rank0, rank1, f"{backend}: ranks differ")
        dropped0, dropped1 = results[(backend, "esam_dropped")]
        assert dropped0 == dropped1 and any(dropped0)
        model = make_mlp()
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        for (x, y), dropped in zip(make_batches(3, size=16), dropped0, strict=True):
            per_worker_step(model, base, list(zip(x.chunk(2), y.chunk(2), strict=True)), rho=0.05,
                            beta=0.5, gamma=0.5, dropped=dropped)
        assert_close(rank0, [p.detach() for p in model.parameters()], scale=10, msg=backend)
        # ESAM built before DDP wraps the model: DDP still sees every parameter as trainable.
        first0, first1 = results[(backend, "esam_built_first")]
        assert_bitwise_equal(first0, first1, f"{backend}: ranks differ with ESAM built first")
        assert results[(backend, "esam_built_first_dropped")] == results[(backend, "esam_dropped")]
        assert_bitwise_equal(first0, rank0, f"{backend}: construction order changes the result")


@pytest.mark.slow  # NOTE (test time): two spawned processes
def test_fsdp2_matches_single_process(distributed_results):
    """FSDP2 on 2 CPU processes: the norm all-reduced over the shards, perturb and restore in place on
    the local shards (the shards' storage never changes), against eager SAM on the global batch; and
    clipping with the norm all-reduced over the shards."""
    results, backends = distributed_results
    ranks = results["fsdp"]
    if ranks is None:
        pytest.skip("torch.distributed.fsdp is unavailable")
    expected = expected_params("synced")
    for backend in backends:
        for rank, results in enumerate(ranks):
            result = results[backend]
            assert result["same_storage"], f"{backend}: rank {rank} swapped parameter storage"
            assert not result["fused"]
            assert_close(result["params"], expected, scale=10, msg=f"{backend}: rank {rank}")
    clipped = expected_params("synced", clip=0.05)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(clipped, expected, strict=True))
    for rank, results in enumerate(ranks):
        assert_close(results[f"{backends[0]}_clip"]["params"], clipped, scale=10,
                     msg=f"clipped: rank {rank}")
