"""torch.compile: the ops trace into one graph (custom ops with fake implementations, no graph break inside
them), and a compiled SAM training step matches eager SAM of eager_reference.py. CPU, the aot_eager
backend (dynamo tracing, fake tensors and functionalization, without a C++ compile)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import slow_on
from eager_reference import ReferenceSAM, batch_loss, make_batches, make_mlp
from tolerance import assert_close

from sam_kernels import backends, ops
from sam_kernels.optim import SAM


def tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (40,)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    return params, grads


def sam_ops(params, grads, backups, buffers, step, backend):
    norm, nonfinite = ops.grad_norm(params, grads, backend=backend)
    ops.perturb_(params, backups, norm, rho=0.05, grads=grads, keep_prob=0.5, seed=7, step=step,
                 backend=backend)
    ops.restore_sgd_step_(params, backups, buffers, lr=0.1, grads=grads, momentum=0.9,
                          found_inf=nonfinite, backend=backend)
    return norm, nonfinite


@slow_on("triton", "torch")  # NOTE (test time): native by default
def test_ops_trace_in_one_graph(backend):
    """fullgraph=True: any graph break inside the ops fails; results equal the eager torch reference.
    (A backend module is imported on first use, which dynamo cannot trace: imported first here.)"""
    backends.get(backend)
    params, grads = tensors()
    expected = [p.clone() for p in params]
    exp_buffers = [torch.zeros_like(p) for p in params]
    exp_norm, _ = sam_ops(expected, grads, [torch.empty_like(p) for p in params], exp_buffers,
                          torch.tensor(3), "torch")
    buffers = [torch.zeros_like(p) for p in params]
    compiled = torch.compile(sam_ops, backend="aot_eager", fullgraph=True)
    norm, nonfinite = compiled(params, grads, [torch.empty_like(p) for p in params], buffers,
                               torch.tensor(3), backend)
    assert_close(norm, exp_norm)
    assert float(nonfinite) == 0.0
    assert_close(params, expected)
    assert_close(buffers, exp_buffers)


def compiled_step(model, sam, compiler):
    """The README's two-call SAM step under torch.compile."""

    @torch.compile(backend=compiler)
    def train_step(x, y):
        loss = batch_loss(model, x, y)
        loss.backward()
        sam.first_step(zero_grad=True)
        batch_loss(model, x, y).backward()
        sam.second_step(zero_grad=True)
        return loss.detach()

    return train_step


@pytest.mark.slow  # NOTE (test time): compiling a whole step is long
def test_compiled_training_step_matches_eager_and_compiles_once(backend):
    """The README's two-pass step under torch.compile (graph breaks allowed outside the ops: backward,
    zero_grad), compiled once for both checks: its first three steps match eager SAM, and over 20 steps no
    graph is compiled after those three (they create the optimizer state and the step plan), so dynamo's
    recompile limit is never reached."""
    torch._dynamo.reset()
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    model = make_mlp()
    ref_model = copy.deepcopy(model)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    base = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref = ReferenceSAM.of_model(ref_model, base, rho=0.05)

    train_step = compiled_step(model, sam, counting_backend)
    counts = []
    for step, (x, y) in enumerate(make_batches(20, size=8)):
        train_step(x, y)
        counts.append(len(graphs))
        if step < 3:
            ref.step([(x, y)])
        if step == 2:
            for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
                assert_close(a.detach(), b.detach(), scale=10)
    assert counts[3:] == [counts[2]] * 17, counts
