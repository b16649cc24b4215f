"""Triton backend specifics: launches per op do not grow with the number of tensors; metadata caching."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.launches import triton_launches
from sam_kernels import ops
from sam_kernels.backends import triton_backend

KERNEL_NAMES = ["sumsq_partials_kernel", "finish_norm_kernel", "perturb_kernel", "restore_kernel",
                "restore_sgd_kernel", "restore_adam_kernel"]


@pytest.fixture
def launches():
    """Launches of each kernel of KERNEL_NAMES (name -> count) while the test runs."""
    with triton_launches(KERNEL_NAMES) as counts:
        yield counts


def launches_per_op(n_tensors, launches, dtypes=(torch.float32,)):
    """Kernel launches of each op for ``n_tensors`` parameters (sizes 1..40) spread over ``dtypes``."""
    params = [torch.randn(1 + i % 40).to(dtypes[i % len(dtypes)]) for i in range(n_tensors)]
    grads = [torch.randn_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    per_op = {}

    def count(op, call):
        launches.clear()
        call()
        per_op[op] = sum(launches.values())

    norm = torch.tensor(1.0)
    count("grad_norm", lambda: ops.grad_norm(params, grads, backend="triton"))
    count("perturb_", lambda: ops.perturb_(params, backups, norm, grads=grads, rho=0.1, keep_prob=0.5,
                                           backend="triton"))
    count("restore_", lambda: ops.restore_(params, backups, backend="triton"))
    count("restore_sgd_step_", lambda: ops.restore_sgd_step_(
        params, backups, [None] * n_tensors, grads=grads, lr=0.1, momentum=0.9, backend="triton"))
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in params]
    count("restore_adam_step_", lambda: ops.restore_adam_step_(
        params, backups, *state, steps, grads=grads, lr=0.1, amsgrad=True, backend="triton"))
    return per_op


@pytest.mark.slow  # NOTE (test time): hundreds of tensors through the interpreter
def test_launches_per_op_do_not_grow_with_tensor_count(launches):
    few, many = launches_per_op(3, launches), launches_per_op(300, launches)
    print(f"\nTriton kernel launches per op, 3 tensors: {few}; 300 tensors: {many}")
    assert few == many
    assert many == {"grad_norm": 2, "perturb_": 1, "restore_": 1, "restore_sgd_step_": 1,
                    "restore_adam_step_": 1}


def test_one_launch_per_dtype_group(launches):
    per_op = launches_per_op(30, launches, dtypes=(torch.float32, torch.bfloat16))
    assert per_op == {"grad_norm": 3, "perturb_": 2, "restore_": 2, "restore_sgd_step_": 2,
                      "restore_adam_step_": 2}


def test_metadata_is_cached_while_storage_is_unchanged():
    params = [torch.randn(10), torch.randn(triton_backend.CHUNK + 1)]
    first = triton_backend._metadata([params])
    assert triton_backend._metadata([params]) is first
    assert first.n_chunks == 3
    assert first.chunk_tensor.tolist() == [0, 1, 1]
    assert first.chunk_start.tolist() == [0, 0, triton_backend.CHUNK]
    assert first.pointers[0].tolist() == [p.data_ptr() for p in params]
    moved = [params[0], torch.randn(triton_backend.CHUNK + 1)]
    assert triton_backend._metadata([moved]) is not first


def test_the_interpreter_turns_a_scalar_into_an_index():
    """The kernels' loops take runtime scalars as range bounds, through ``__index__``. The interpreter
    holds a scalar as a one-element array, which Triton 3.6 failed to convert under newer NumPy (every
    launch failed); the backend fixes the conversion where the interpreter needs it, and only once."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if interpreter is None or not isinstance(triton_backend.kernels.sumsq_partials_kernel,
                                             interpreter.InterpretedFunction):
        pytest.skip("the kernels are compiled, not interpreted")
    index = triton_backend.interpreter_tensor_attributes(interpreter._patch_lang_tensor)["__index__"]
    assert index(SimpleNamespace(handle=SimpleNamespace(data=np.array([7], dtype=np.int32)))) == 7
    fixed = getattr(interpreter._patch_lang_tensor, "squeezes_index", False)
    assert triton_backend.INTERPRETER_INDEX_FIXED is fixed
    assert not triton_backend._interpreter_index_fix()

#: Registers a kernel may use (ptxas's count): at most 128 leaves room for two 256-thread blocks per SM.
MAX_REGISTERS = 128


@pytest.mark.slow  # NOTE (test time): compiles every kernel ahead of time for a GPU
@pytest.mark.parametrize("sm", [80, 90])
def test_gpu_properties_in_the_ptx(sm):
    """Every kernel variant the backend can launch (each dtype and option), compiled ahead of time for
    sm_80 / sm_90 (no GPU needed): IEEE division (no ``div.full``/``div.approx``), no approximate
    ``ex2`` (Adam's bias corrections), AMSGrad's max
    propagating NaN like the reference and native; on the aligned path 128-bit global loads and stores;
    and, as ptxas reports them, no spills and at most MAX_REGISTERS registers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_ptx.py")
    result = subprocess.run([sys.executable, str(script), str(sm)], capture_output=True, text=True, env=env,
                            timeout=900, cwd=Path(__file__).parents[2])
    if result.returncode != 0 and "GPUTarget" in result.stderr and "ImportError" in result.stderr:
        pytest.skip("this Triton cannot compile ahead of time")
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(counts) == 135
    for name, found in counts.items():
        wide = name.endswith("fp64")  # fp64 math: IEEE `/`, 16-byte accesses of two doubles
        assert found["div.full.f32"] == found["div.approx"] == 0, (name, found)
        assert found["ex2.approx"] == 0, (name, found)  # Adam's bias corrections: fp64 squaring
        if name.startswith("adam"):
            assert found["div.rn.f64" if wide else "div.rn.f32"] > 0, (name, found)
        if name.startswith("perturb_n1"):
            assert found["div.rn.f32"] > 0, (name, found)  # the fp32 scale, for every dtype
        if name.startswith("noise"):  # the noise contract: IEEE-exact float32 arithmetic only
            assert found["fma"] == found["approx"] == 0, (name, found)
            assert found["div.rn.f32"] > 0 and found["sqrt.rn.f32"] > 0, (name, found)
        loads, stores = ("ld.v2.b64", "st.v2.b64") if wide else ("ld.v4.b32", "st.v4.b32")
        if "unaligned" in name:
            assert found[loads] == 0, (name, found)  # the general path: no alignment to rely on
        else:
            assert found[loads] > 0, (name, found)
            assert found[stores] > 0 or name.startswith("sumsq"), (name, found)
        assert found["local"] == 0, (name, found)
        if found.get("registers") is not None:
            assert found["spill_bytes"] == 0, (name, found)
            assert found["registers"] <= MAX_REGISTERS, (name, found)
        if "a1s" in name and name.startswith("adam") and not wide:
            assert found["max.NaN.f32"] > 0 and found["max.f32"] == 0, (name, found)


def test_aligned_path_is_chosen_by_address_and_both_paths_agree():
    """Tensors at 16-byte aligned addresses take the unmasked vector path; a view one element into its
    storage takes the general, masked one; both give the reference's results (a chunk's whole blocks
    and its tail)."""
    from sam_kernels import ops

    storage = [torch.randn(triton_backend.CHUNK + 3001) for _ in range(3)]
    aligned = [t[: triton_backend.CHUNK + 3000] for t in storage]
    shifted = [t[1:] for t in storage]
    assert triton_backend._metadata([aligned]).aligned
    assert not triton_backend._metadata([shifted]).aligned
    for params in (aligned, shifted):
        grads = [torch.randn_like(p) for p in params]
        results = {}
        for backend in ("triton", "torch"):
            # NOTE: the copies keep the originals' alignment (a shifted view for the shifted ones)
            w = [torch.empty(p.numel() + (params is shifted))[int(params is shifted):].copy_(p)
                 for p in params]
            backups = [torch.empty_like(p) for p in w]
            norm, _ = ops.grad_norm(w, grads, backend=backend)
            ops.perturb_(w, backups, norm, rho=0.1, grads=grads, keep_prob=0.5, seed=3, backend=backend)
            ops.restore_sgd_step_(w, backups, [torch.zeros_like(p) for p in w], lr=0.1, grads=grads,
                                  momentum=0.9, backend=backend)
            results[backend] = (norm, w)
        assert torch.allclose(results["triton"][0], results["torch"][0], rtol=1e-6)
        for a, b in zip(results["triton"][1], results["torch"][1], strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def _layerwise_sam(groups: int, momentum: float = 0.9):
    """SAM over ``groups`` param groups (layer-wise learning rates) of small linear layers."""
    from sam_kernels.optim import SAM

    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(groups)]
    sam = SAM([{"params": layer.parameters(), "lr": 0.1 * 0.9 ** i} for i, layer in enumerate(layers)],
              torch.optim.SGD, lr=0.1, momentum=momentum, rho=0.05, backend="triton")
    x = torch.randn(3, 4)

    def step():
        """One SAM step whose gradients stay in place (``set_to_none=False``, as a captured step's must):
        a table is keyed by its operands' addresses, gradients included."""
        for closure_pass in range(2):
            out = x
            for layer in layers:
                out = torch.tanh(layer(out))
            out.sum().backward()
            (sam.first_step if closure_pass == 0 else sam.second_step)()
            sam.zero_grad(set_to_none=False)

    return sam, step


def _tables_built(monkeypatch) -> list:
    built = []
    original = triton_backend._Metadata.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(triton_backend._Metadata, "__init__", counting)
    return built


@pytest.mark.slow  # NOTE (test time): many interpreted steps
def test_the_step_plan_owns_its_launch_tables(monkeypatch):
    """With 40 param groups (more tables than the functional API's shared set holds) the tables are built
    in the first two steps (the second descent's differ: its momentum buffers are no longer new) and
    never again, and the shared set is left alone."""
    built = _tables_built(monkeypatch)
    triton_backend._metadata_cache.clear()
    sam, step = _layerwise_sam(40)
    step()
    step()
    warm = len(built)
    assert warm > triton_backend.METADATA_CACHE_SIZE
    for _ in range(3):
        step()
    assert len(built) == warm
    assert len(triton_backend._metadata_cache) == 0
    assert len(sam._run.plan.backend.tables) == warm


def test_a_table_missing_during_graph_capture_raises(monkeypatch):
    """Under CUDA-graph capture a table is never built (its host-to-device copy would be recorded from a
    staging buffer reused later): a step that needs a new one raises and says to warm up first; a
    warmed-up step runs."""
    sam, step = _layerwise_sam(2)
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match=r"not ready during CUDA-graph capture.*eagerly before"):
        step()
    sam.zero_grad(set_to_none=False)
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: False)
    step()
    step()
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: True)
    step()


def _opcheck_cases():
    shapes = [(7,), (3, 5), (triton_backend.CHUNK + 3,)]
    generator = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=generator) for s in shapes]
    g = [torch.randn(s, generator=generator) for s in shapes]
    b = [torch.empty_like(t) for t in p]
    norm, step, scalar = torch.tensor(2.0), torch.tensor(3, dtype=torch.int64), torch.tensor(0.5)
    steps = [torch.tensor(2.0) for _ in p]
    ops_ = torch.ops.sam_kernels_triton
    state = [[x.abs().clone() for x in g] for _ in range(3)]
    return {
        "grad_norm": (ops_.grad_norm.default, (g, [], 0.0, 0)),
        "grad_norm_adaptive": (ops_.grad_norm.default, (g, p, 0.01, 0)),
        "perturb_": (ops_.perturb_.default, (p, g, b, [0, 5, 9], norm, step, 0.05, 1e-12, 1 << 23, 2.0, True,
                                             True, 0.0, 1, 2, 0)),
        "restore_": (ops_.restore_.default, (p, b, 0)),
        "restore_sgd_step_": (ops_.restore_sgd_step_.default,
                              (p, b, g, [x.clone() for x in g], [1, 0, 0], [0.1, 0.9, 0.0, 1e-4, 1.0, 0.0],
                               scalar, torch.tensor(0.0), 0)),
        "restore_adam_step_": (ops_.restore_adam_step_.default,
                               (p, b, g, *state, steps, [1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0, 1.0, 0.0],
                                scalar, None, 0)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    """The launches are torch.library custom ops (schemas with their mutations, fake implementations),
    so torch.compile traces the backend without graph breaks; opcheck runs under the interpreter."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_launch_tables_shrink_to_a_lowered_capacity():
    """A rebuilt plan of fewer groups lowers its tables' capacity; the next table evicts down to it."""
    tables = triton_backend.LaunchTables(6)
    for key in range(6):
        tables.add((key,), object())
    tables.capacity = 2
    tables.add(("new",), object())
    assert list(tables) == [(5,), ("new",)]


def test_a_pickled_triton_optimizer_gets_tables_of_its_own():
    """A pickled optimizer's plan carries no launch tables (a cache, so unpickling needs no Triton
    object); the unpickled plan finds the Triton backend again, with an empty set of its own."""
    import pickle

    sam, step = _layerwise_sam(3)
    step()
    copy = pickle.loads(pickle.dumps(sam))
    assert copy._run.plan.backend.tables is not sam._run.plan.backend.tables
    assert len(copy._run.plan.backend.tables) == 0
