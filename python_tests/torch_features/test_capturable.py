"""capturable=True: the step, the RNG step and the per-step scalars stay on the device and no step reads
a device value on the host (checked on the CPU by intercepting the ops that would); a CUDA-graph capture
and replay against eager steps (GPU only)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from eager_reference import HostSyncCounter, ReferenceSAM, batch_loss, make_batches, make_mlp
from targets import CPU_KERNEL_BACKENDS, require
from tolerance import assert_close

from sam_kernels.optim import ESAM, SAM

BASES = {"sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), "adam": (torch.optim.Adam, {"lr": 0.01})}


@pytest.mark.parametrize("capturable", [True, False])
@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("base", BASES)
def test_fused_step_makes_no_host_sync(base, backend, capturable):
    """From the very first step on (step plan and state creation included), on each kernel backend, with
    and without capturable=True; the trajectory still matches an eager SAM over the same base
    optimizer."""
    require(backend)
    base_cls, options = BASES[base]
    model, ref_model = make_mlp(), make_mlp()
    sam = SAM(model.parameters(), base_cls, rho=0.05, backend=backend, capturable=capturable, **options)
    ref = ReferenceSAM.of_model(ref_model, base_cls(ref_model.parameters(), **options), rho=0.05)
    for x, y in make_batches(3, size=8):
        with HostSyncCounter() as counter:
            sam.zero_grad(set_to_none=False)
            batch_loss(model, x, y).backward()
            sam.first_step()
            sam.zero_grad(set_to_none=False)
            batch_loss(model, x, y).backward()
            sam.second_step()
        assert counter.syncs == [], f"host reads in a fused step: {counter.syncs}"
        ref.step([(x, y)])
    assert_close([p.detach() for p in model.parameters()], [p.detach() for p in ref_model.parameters()],
                 scale=10)


def test_capturable_step_survives_replays_and_reload():
    """The device RNG step is the one the checkpoint records, and loading writes into the same tensor
    (a captured graph keeps reading its address)."""
    model = make_mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="torch",
              capturable=True)
    device_step = sam._rng_step(torch.device("cpu"))
    for x, y in make_batches(2, size=8):
        batch_loss(model, x, y).backward()
        sam.first_step(zero_grad=True)
        batch_loss(model, x, y).backward()
        sam.second_step(zero_grad=True)
    device_step.add_(5)  # what five replays of a captured step would leave behind
    state = sam.state_dict()
    assert state["sam"]["step"] == 7
    state["sam"]["step"] = 3
    sam.load_state_dict(copy.deepcopy(state))
    assert sam._rng_step(torch.device("cpu")) is device_step
    assert int(device_step) == 3


def test_capturable_rejects_host_paths():
    model = make_mlp()
    with pytest.raises(ValueError, match="capturable"):
        SAM(model.parameters(), torch.optim.RMSprop, lr=0.01, capturable=True)
    with pytest.raises(ValueError, match="capturable"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, fused=False, capturable=True)
    with pytest.raises(ValueError, match="capturable"):
        ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=1.0, lr=0.1, capturable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_cuda_graph_capture_and_replay(backend):
    """A whole SAM step (both forwards and backwards, first_step, second_step) captured once and
    replayed, against the independent eager SAM of eager_reference.py."""
    from sam_kernels.backends import resolve
    try:
        resolve(torch.device("cuda"), backend)
    except RuntimeError as error:
        pytest.skip(str(error))
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter copies every tensor to the host, which a CUDA graph cannot "
                    "capture: run with TRITON_INTERPRET=0 (scripts/gpu_check.sh does)")
    device = torch.device("cuda")
    model = make_mlp().to(device)
    ref_model = copy.deepcopy(model)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend,
              capturable=True)
    base = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref = ReferenceSAM.of_model(ref_model, base, rho=0.05)
    data = [(x.to(device), y.to(device)) for x, y in make_batches(6, size=8)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def step():
        sam.zero_grad(set_to_none=False)
        batch_loss(model, static_x, static_y).backward()
        sam.first_step()
        sam.zero_grad(set_to_none=False)
        batch_loss(model, static_x, static_y).backward()
        sam.second_step()

    def ref_step(x, y):
        ref.step([(x, y)])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:  # warm-up: gradients, backups, state and metadata allocated here
            static_x.copy_(x)
            static_y.copy_(y)
            step()
            ref_step(x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        ref_step(x, y)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)
    assert sam.state_dict()["sam"]["step"] == 6
