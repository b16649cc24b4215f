"""Launch glue of the Triton backend: metadata tables, one launch per op per dtype group.

The kernels themselves are in ``triton_kernels.py``. Inputs arrive validated by ``sam_kernels.ops``
(one device, supported dtypes, dense layouts shared by each parameter's companions, no missing
gradients). A dense tensor is one flat array from its data pointer (see "layout" in ``common.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import numpy
import torch
import triton.language as tl

from . import triton_kernels as kernels
from .common import (
    MASK_BITS,
    AdamConfig,
    NoiseConfig,
    PerturbConfig,
    SgdConfig,
    compute_dtype,
    config_from_values,
    group_by_dtype,
    split_u64,
)


class _AttributeRecorder:
    """Stands in for the Triton interpreter's patch scope: records the attributes it would set."""

    def __init__(self) -> None:
        self.attributes: dict = {}

    def set_attr(self, owner, name, value) -> None:
        self.attributes[name] = value


def interpreter_tensor_attributes(patch_tensor) -> dict:
    """The attributes that the interpreter's ``patch_tensor`` gives ``tl.tensor`` while a kernel runs,
    recorded and not set."""
    recorder = _AttributeRecorder()
    patch_tensor(tl.tensor, recorder)
    return recorder.attributes


def _interpreter_index_fix() -> bool:
    """Makes a scalar's ``__index__`` work in Triton interpreters that turn it into a Python int badly;
    returns whether it changed anything. Nothing changes when the kernels are compiled.

    NOTE (interpreter scalars): the interpreter holds a scalar (a program id, a loaded or computed scalar)
    as a one-element, one-dimensional NumPy array, and the kernels' ``range(start, full_end, BLOCK)`` turns
    such bounds into Python ints through ``__index__``. Triton 3.6's interpreter does that with
    ``int(data)``, which NumPy's newer releases refuse for any array with a dimension ("only
    0-dimensional arrays can be converted to Python scalars"), so every launch failed; later Triton
    releases convert ``int(data.squeeze())``, which this installs where the interpreter's own conversion
    fails on a one-element array (tried on a stand-in of one; ``tl.tensor`` itself is left as it is).
    """
    interpreter = sys.modules.get("triton.runtime.interpreter")  # imported by triton.jit when interpreting
    if interpreter is None or not isinstance(kernels.sumsq_partials_kernel,
                                             getattr(interpreter, "InterpretedFunction", ())):
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False):
        return False
    try:
        index = interpreter_tensor_attributes(patch_tensor)["__index__"]
        index(types.SimpleNamespace(handle=types.SimpleNamespace(data=numpy.zeros(1, numpy.int32))))
        return False
    except TypeError:
        pass
    except Exception:  # an interpreter of another make: left as it is
        return False

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_index = True
    interpreter._patch_lang_tensor = patched
    return True


#: Whether the interpreter's scalar conversion was fixed here (see "interpreter scalars").
INTERPRETER_INDEX_FIXED = _interpreter_index_fix()

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}

#: Elements per block (the vector width of one loop iteration).
BLOCK = 1024
#: Elements per chunk: one program handles one chunk of one tensor.
CHUNK = 16 * BLOCK
#: Width of the single program that sums the norm's partials.
FINISH_BLOCK = 1024
#: Byte alignment of the kernels' vector path (16 bytes: one 128-bit access per thread per step).
ALIGNMENT = 16
#: Register budget of the Adam kernel. NOTE (registers): left to itself, ptxas 13 fits some 16-bit Adam
#: variants into 64 registers with 24 bytes of spills (sm_80 or sm_90); .maxnreg 96 lets it allocate the
#: 70-96 they need without spills. The other kernels need no bound. Checked ahead of time in the tests.
ADAM_MAX_REGISTERS = 96
#: Register budget of the Gaussian noise kernel. NOTE (registers): eight Box-Muller draws per thread for
#: 16-bit tensors; left to itself ptxas 13 fits the precision variant into 96 registers with 8 bytes of
#: spills (sm_90); .maxnreg 128 lets it allocate what it needs. Checked ahead of time in the tests.
NOISE_MAX_REGISTERS = 128
#: Tables kept for calls outside an optimizer's step plan (the functional API): they only change when
#: the tensors are reallocated.
METADATA_CACHE_SIZE = 64


class _Metadata:
    """Device tables of one launch: views into one packed int64 tensor (a single host-to-device copy).

    NOTE (layout of the packed tensor): ``[pointer rows: n_lists x n_tensors | numels: n_tensors |
    extra rows: n_extra x n_tensors | chunk_tensor: n_chunks | chunk_start: n_chunks]``.
    """

    def __init__(self, packed: torch.Tensor, n_lists: int, n_tensors: int, n_extra: int, n_chunks: int,
                 aligned: bool):
        self.packed = packed
        self.n_chunks = n_chunks
        #: Every operand's base address is 16-byte aligned: the kernels' unmasked vector path.
        self.aligned = aligned
        #: Streams the table was read on (see ``_in_use``), and whether a captured graph reads it.
        self.streams: set = set()
        self.captured = False
        rows = packed[: (n_lists + 1 + n_extra) * n_tensors].view(n_lists + 1 + n_extra, n_tensors)
        self.pointers = [rows[i] for i in range(n_lists)]
        self.numels = rows[n_lists]
        self.extra = [rows[n_lists + 1 + i] for i in range(n_extra)]
        chunks = packed[(n_lists + 1 + n_extra) * n_tensors:]
        self.chunk_tensor, self.chunk_start = chunks[:n_chunks], chunks[n_chunks:]


class LaunchTables(OrderedDict):
    """A least-recently-used set of metadata tables, keyed by content.

    NOTE (ownership): an optimizer's step plan owns one, sized to its working set (a few tables per op,
    param group and dtype), so layer-wise learning rates with many groups never evict a table they use
    next step; the functional API shares one module-level set. Tables used while a CUDA graph is being
    captured are also kept in ``_CAPTURED`` for the life of the process: the graph reads them at every
    replay, whatever the sets evict later.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def add(self, key: tuple, meta: _Metadata) -> None:
        self[key] = meta
        while len(self) > self.capacity:  # the capacity may have shrunk (a plan of fewer groups)
            self.popitem(last=False)


_metadata_cache = LaunchTables(METADATA_CACHE_SIZE)
_CAPTURED: list[_Metadata] = []


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _metadata(tensor_lists: Sequence[Sequence[torch.Tensor]], extra_rows: Sequence[Sequence[int]] = (),
              tables: LaunchTables | None = None) -> _Metadata:
    """Pointer, size and chunk tables for tensors that share one device and dtype.

    ``tensor_lists[k][i]`` is the k-th operand of tensor i (param, grad, backup, ...); ``extra_rows`` are
    per-tensor integers (global tensor index, first-step flag). Cached by content in ``tables`` (the
    module's set by default): a list of tensors that keeps its storage (the usual case in training)
    reuses its tables every step.
    """
    tables = _metadata_cache if tables is None else tables
    device = tensor_lists[0][0].device
    numels = [t.numel() for t in tensor_lists[0]]
    pointers = [t.data_ptr() for tensors in tensor_lists for t in tensors]
    key = (device, len(tensor_lists), tuple(pointers), tuple(numels),
           tuple(tuple(row) for row in extra_rows), CHUNK)
    cached = tables.get(key)
    if cached is not None:
        tables.move_to_end(key)
        return _in_use(cached, device)
    if _capturing(device):
        # NOTE (graph capture): building a table copies it from pinned host memory that is reused after
        # the capture, so a captured graph would replay whatever that buffer holds then.
        raise RuntimeError("sam_kernels (triton backend): a launch table is not ready during CUDA-graph "
                           "capture (a new set of tensors); run the same step once eagerly before "
                           "capturing it (torch.cuda.graph's warm-up iterations)")
    chunk_tensor, chunk_start = [], []
    for row, numel in enumerate(numels):
        for start in range(0, numel, CHUNK):
            chunk_tensor.append(row)
            chunk_start.append(start)
    values = pointers + numels + [v for row in extra_rows for v in row] + chunk_tensor + chunk_start
    packed = torch.tensor(values, dtype=torch.int64)
    if device.type != "cpu":
        # NOTE: a pinned source makes the copy asynchronous; the caching host allocator keeps the pinned
        # buffer alive until the copy has run, so the host never waits here.
        packed = packed.pin_memory().to(device, non_blocking=True)
    aligned = all(pointer % ALIGNMENT == 0 for pointer in pointers)
    meta = _Metadata(packed, len(tensor_lists), len(numels), len(extra_rows), len(chunk_tensor), aligned)
    tables.add(key, meta)
    return _in_use(meta, device)


def _in_use(meta: _Metadata, device: torch.device) -> _Metadata:
    """``meta`` about to be read by a launch on the current stream.

    NOTE (streams): the caching allocator frees a tensor for reuse on the stream it was allocated on;
    a table read on another stream is recorded there, so an eviction cannot hand its memory out while
    that stream's launch may still read it."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        if stream not in meta.streams:
            meta.packed.record_stream(stream)
            meta.streams.add(stream)
        if _capturing(device) and not meta.captured:
            meta.captured = True
            _CAPTURED.append(meta)
    return meta


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pick(tensors: Sequence, positions: Sequence[int]) -> list:
    return [tensors[i] for i in positions]


def _launch_grad_norm(grads, weights, adaptive_eta, tables: LaunchTables | None = None):
    """Two-stage deterministic norm: one partials launch per dtype group, then one finishing launch."""
    device = grads[0].device if grads else torch.device("cpu")
    norm = torch.empty((), dtype=torch.float32, device=device)
    nonfinite = torch.empty((), dtype=torch.float32, device=device)
    groups = group_by_dtype(grads)
    lists = [[_pick(grads, g)] + ([_pick(weights, g)] if weights is not None else []) for g in groups]
    metas = [_metadata(group_lists, tables=tables) for group_lists in lists]
    n_partials = sum(meta.n_chunks for meta in metas)
    partials = torch.empty(max(n_partials, 1), dtype=torch.float32, device=device)
    offset = 0
    with _device_guard(device):
        for group_lists, meta in zip(lists, metas, strict=False):
            if meta.n_chunks == 0:
                continue
            adaptive = weights is not None
            dtype = group_lists[0][0].dtype
            kernels.sumsq_partials_kernel[(meta.n_chunks,)](
                meta.pointers[0], meta.pointers[1] if adaptive else meta.pointers[0], meta.numels,
                meta.chunk_tensor, meta.chunk_start, partials, offset, float(adaptive_eta),
                GRAD_DTYPE=TL_DTYPES[dtype], WEIGHT_DTYPE=TL_DTYPES[group_lists[-1][0].dtype],
                ADAPTIVE=adaptive, CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=meta.aligned, num_warps=num_warps(dtype),
            )
            offset += meta.n_chunks
        kernels.finish_norm_kernel[(1,)](partials, n_partials, norm, nonfinite, BLOCK=FINISH_BLOCK)
    return norm, nonfinite


def _launch_perturb(params, grads, backups, tensor_indices, norm, step, config: PerturbConfig,
                    tables: LaunchTables | None = None) -> None:
    seed_lo, seed_hi = split_u64(config.seed)
    with _device_guard(params[0].device):
        for group in group_by_dtype(params):
            group_params = _pick(params, group)
            meta = _metadata([group_params, _pick(grads, group), _pick(backups, group)],
                             [_pick(tensor_indices, group)], tables)
            if meta.n_chunks == 0:
                continue
            kernels.perturb_kernel[(meta.n_chunks,)](
                *meta.pointers, meta.numels, meta.extra[0], meta.chunk_tensor, meta.chunk_start,
                norm, step, float(config.rho), float(config.eps), float(config.scale_factor),
                float(config.adaptive_eta), seed_lo, seed_hi, config.keep_threshold,
                PARAM_DTYPE=TL_DTYPES[group_params[0].dtype], GRAD_DTYPE=TL_DTYPES[grads[group[0]].dtype],
                COMPUTE=_compute(group_params[0].dtype), NORMALIZE=config.normalize,
                ADAPTIVE=config.adaptive, MASKED=config.masked, CHUNK=CHUNK,
                BLOCK=BLOCK, ALIGNED=meta.aligned, num_warps=num_warps(group_params[0].dtype),
            )


def _launch_noise(params, backups, scales, tensor_indices, step, config: NoiseConfig,
                  tables: LaunchTables | None = None) -> None:
    seed_lo, seed_hi = split_u64(config.seed)
    with _device_guard(params[0].device):
        for group in group_by_dtype(params):
            group_params = _pick(params, group)
            meta = _metadata([group_params, _pick(backups, group), _pick(scales, group)],
                             [_pick(tensor_indices, group)], tables)
            if meta.n_chunks == 0:
                continue
            dtype = group_params[0].dtype
            # NOTE (noise contract): enable_fp_fusion=False: no multiply-add of the Box-Muller transform
            # (or of w + sigma * z) may become an FMA on a GPU, so the noise is the other backends' bit for
            # bit. (The interpreter ignores the option; its NumPy math rounds each operation.)
            kernels.noise_kernel[(meta.n_chunks,)](
                *meta.pointers, meta.numels, meta.extra[0], meta.chunk_tensor, meta.chunk_start, step,
                float(config.factor), seed_lo, seed_hi,
                PARAM_DTYPE=TL_DTYPES[dtype], COMPUTE=_compute(dtype), PRECISION=bool(config.precision),
                CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=meta.aligned, num_warps=num_warps(dtype),
                enable_fp_fusion=False, maxnreg=NOISE_MAX_REGISTERS,
            )


def _launch_restore(params, backups, tables: LaunchTables | None = None) -> None:
    with _device_guard(params[0].device):
        for group in group_by_dtype(params):
            group_params = _pick(params, group)
            meta = _metadata([group_params, _pick(backups, group)], tables=tables)
            if meta.n_chunks == 0:
                continue
            kernels.restore_kernel[(meta.n_chunks,)](
                *meta.pointers, meta.numels, meta.chunk_tensor, meta.chunk_start,
                PARAM_DTYPE=TL_DTYPES[group_params[0].dtype], CHUNK=CHUNK, BLOCK=BLOCK,
                ALIGNED=meta.aligned, num_warps=num_warps(group_params[0].dtype),
            )


def num_warps(dtype: torch.dtype) -> int:
    """Warps of a launch over tensors of ``dtype``: BLOCK elements spread so that each thread moves
    exactly 16 bytes of each operand per block (one 128-bit access on the aligned path).

    NOTE (registers): with 4 warps, fp32 would take two 128-bit accesses per thread and operand, and
    ptxas then spills 16-24 bytes in the copy and plain perturb loops on sm_80 and sm_90; one access per
    thread keeps every variant free of spills (checked ahead of time in the tests)."""
    return BLOCK * torch.tensor([], dtype=dtype).element_size() // (16 * 32)


def _optional_scalars(meta, grad_multiplier, found_inf):
    """Device scalars for the kernels, with a placeholder pointer where one is absent."""
    placeholder = meta.packed
    return (grad_multiplier if grad_multiplier is not None else placeholder,
            found_inf if found_inf is not None else placeholder)


def _launch_sgd(params, backups, grads, momentum_buffers, first_step, config: SgdConfig, grad_multiplier,
                found_inf, tables: LaunchTables | None = None) -> None:
    has_momentum = config.momentum != 0
    with _device_guard(params[0].device):
        for group in group_by_dtype(params):
            group_params = _pick(params, group)
            lists = [group_params, _pick(backups, group), _pick(grads, group)]
            if has_momentum:
                lists.append(_pick(momentum_buffers, group))
            meta = _metadata(lists, [[int(first_step[i]) for i in group]], tables)
            if meta.n_chunks == 0:
                continue
            pointers = meta.pointers + ([] if has_momentum else [meta.pointers[0]])
            kernels.restore_sgd_kernel[(meta.n_chunks,)](
                *pointers, meta.numels, meta.extra[0], meta.chunk_tensor, meta.chunk_start,
                *_optional_scalars(meta, grad_multiplier, found_inf), *config.kernel_scalars(),
                PARAM_DTYPE=TL_DTYPES[group_params[0].dtype], GRAD_DTYPE=TL_DTYPES[grads[group[0]].dtype],
                COMPUTE=_compute(group_params[0].dtype), **config.kernel_switches(),
                HAS_MULTIPLIER=grad_multiplier is not None, HAS_FOUND_INF=found_inf is not None,
                CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=meta.aligned,
                num_warps=num_warps(group_params[0].dtype),
            )


def _launch_adam(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, config: AdamConfig,
                 grad_multiplier, found_inf, tables: LaunchTables | None = None) -> None:
    with _device_guard(params[0].device):
        for group in group_by_dtype(params):
            group_params = _pick(params, group)
            max_sqs = _pick(max_exp_avg_sqs, group) if config.amsgrad else _pick(exp_avg_sqs, group)
            meta = _metadata([group_params, _pick(backups, group), _pick(grads, group),
                              _pick(exp_avgs, group), _pick(exp_avg_sqs, group), max_sqs,
                              _pick(steps, group)], tables=tables)
            if meta.n_chunks == 0:
                continue
            dtype = group_params[0].dtype
            kernels.restore_adam_kernel[(meta.n_chunks,)](
                *meta.pointers, meta.numels, meta.chunk_tensor, meta.chunk_start,
                *_optional_scalars(meta, grad_multiplier, found_inf), *config.kernel_scalars(),
                PARAM_DTYPE=TL_DTYPES[dtype], GRAD_DTYPE=TL_DTYPES[grads[group[0]].dtype],
                COMPUTE=_compute(dtype), **config.kernel_switches(),
                HAS_MULTIPLIER=grad_multiplier is not None, HAS_FOUND_INF=found_inf is not None,
                CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=meta.aligned,
                num_warps=num_warps(group_params[0].dtype), maxnreg=ADAM_MAX_REGISTERS,
            )


def _compute(dtype: torch.dtype):
    return TL_DTYPES[compute_dtype(dtype)]


# ---------------------------------------------------------------------------- torch.library registration
# NOTE (torch.compile): the launches are registered as custom ops (namespace ``sam_kernels_triton``, the
# native ops' schemas plus the launch-table set) with fake implementations, so dynamo traces a step
# through them without a graph break and torch.library.opcheck checks them. They are opaque custom ops,
# not torch.library.triton_op: the kernels read address tables built from the tensors' data pointers,
# which a traced triton_op body (fake tensors) cannot build.

#: Launch-table sets by id (0: the module's own), so that a custom op, which takes no Python objects,
#: finds its caller's.
_TABLE_SETS: weakref.WeakValueDictionary[int, LaunchTables] = weakref.WeakValueDictionary()
_NEXT_TABLE_SET = itertools.count(1)


def _tables(table_set: int) -> LaunchTables:
    return _TABLE_SETS.get(table_set, _metadata_cache) if table_set else _metadata_cache


@torch.library.custom_op("sam_kernels_triton::grad_norm", mutates_args=())
def _grad_norm_op(grads: list[torch.Tensor], weights: list[torch.Tensor], adaptive_eta: float,
                  table_set: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_grad_norm(grads, weights or None, adaptive_eta, _tables(table_set))


@torch.library.custom_op("sam_kernels_triton::perturb_", mutates_args=("params", "backups"))
def _perturb_op(params: list[torch.Tensor], grads: list[torch.Tensor], backups: list[torch.Tensor],
                tensor_indices: list[int], norm: torch.Tensor, step: torch.Tensor, rho: float, eps: float,
                keep_threshold: int, scale_factor: float, normalize: bool, adaptive: bool,
                adaptive_eta: float, seed_lo: int, seed_hi: int, table_set: int) -> None:
    config = PerturbConfig(rho=rho, eps=eps, keep_prob=keep_threshold / (1 << MASK_BITS),
                           scale_factor=scale_factor, normalize=normalize, adaptive=adaptive,
                           adaptive_eta=adaptive_eta, seed=seed_lo | (seed_hi << 32))
    _launch_perturb(params, grads, backups, tensor_indices, norm, step, config, _tables(table_set))


@torch.library.custom_op("sam_kernels_triton::gaussian_noise_", mutates_args=("params", "backups"))
def _gaussian_noise_op(params: list[torch.Tensor], backups: list[torch.Tensor], scales: list[torch.Tensor],
                       tensor_indices: list[int], step: torch.Tensor, config: list[float], seed_lo: int,
                       seed_hi: int, table_set: int) -> None:
    noise = NoiseConfig(factor=config[0], precision=bool(config[1]), seed=seed_lo | (seed_hi << 32))
    _launch_noise(params, backups, scales, tensor_indices, step, noise, _tables(table_set))


@torch.library.custom_op("sam_kernels_triton::restore_", mutates_args=("params",))
def _restore_op(params: list[torch.Tensor], backups: list[torch.Tensor], table_set: int) -> None:
    _launch_restore(params, backups, _tables(table_set))


@torch.library.custom_op("sam_kernels_triton::restore_sgd_step_", mutates_args=("params", "momentum_buffers"))
def _restore_sgd_step_op(params: list[torch.Tensor], backups: list[torch.Tensor], grads: list[torch.Tensor],
                         momentum_buffers: list[torch.Tensor], first_step: list[int], config: list[float],
                         grad_multiplier: torch.Tensor | None, found_inf: torch.Tensor | None,
                         table_set: int) -> None:
    _launch_sgd(params, backups, grads, momentum_buffers, first_step, config_from_values(SgdConfig, config),
                grad_multiplier, found_inf, _tables(table_set))


@torch.library.custom_op("sam_kernels_triton::restore_adam_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def _restore_adam_step_op(params: list[torch.Tensor], backups: list[torch.Tensor], grads: list[torch.Tensor],
                          exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                          max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], config: list[float],
                          grad_multiplier: torch.Tensor | None, found_inf: torch.Tensor | None,
                          table_set: int) -> None:
    _launch_adam(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None, steps,
                 config_from_values(AdamConfig, config), grad_multiplier, found_inf, _tables(table_set))


@_grad_norm_op.register_fake
def _(grads, weights, adaptive_eta, table_set):
    like = grads[0] if grads else torch.empty(())
    return like.new_empty((), dtype=torch.float32), like.new_empty((), dtype=torch.float32)


for _op in (_perturb_op, _gaussian_noise_op, _restore_op, _restore_sgd_step_op, _restore_adam_step_op):
    _op.register_fake(lambda *args: None)


# ---------------------------------------------------------------------------- the backend interface


def grad_norm(grads, weights, adaptive_eta, table_set: int = 0):
    """Two-stage deterministic norm: one partials launch per dtype group, then one finishing launch."""
    return torch.ops.sam_kernels_triton.grad_norm(grads, weights if weights is not None else [],
                                                  float(adaptive_eta), table_set)


def perturb_(params, grads, backups, tensor_indices, norm, step, config: PerturbConfig,
             table_set: int = 0) -> None:
    seed_lo, seed_hi = split_u64(config.seed)
    torch.ops.sam_kernels_triton.perturb_(
        params, grads, backups, tensor_indices, norm, step, config.rho, config.eps, config.keep_threshold,
        config.scale_factor, config.normalize, config.adaptive, config.adaptive_eta, seed_lo, seed_hi,
        table_set)


def gaussian_noise_(params, backups, scales, tensor_indices, step, config: NoiseConfig,
                    table_set: int = 0) -> None:
    seed_lo, seed_hi = split_u64(config.seed)
    torch.ops.sam_kernels_triton.gaussian_noise_(params, backups, scales, tensor_indices, step,
                                                 config.values(), seed_lo, seed_hi, table_set)


def restore_(params, backups, table_set: int = 0) -> None:
    torch.ops.sam_kernels_triton.restore_(params, backups, table_set)


def restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config: SgdConfig,
                      grad_multiplier, found_inf, table_set: int = 0) -> None:
    buffers = momentum_buffers if config.momentum != 0 else []
    torch.ops.sam_kernels_triton.restore_sgd_step_(params, backups, grads, buffers, first_step,
                                                   config.values(), grad_multiplier, found_inf, table_set)


def restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                       config: AdamConfig, grad_multiplier, found_inf, table_set: int = 0) -> None:
    max_sqs = max_exp_avg_sqs if config.amsgrad else []
    torch.ops.sam_kernels_triton.restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_sqs,
                                                    steps, config.values(), grad_multiplier, found_inf,
                                                    table_set)


class PlanBackend:
    """The backend interface over a step plan's own launch tables (see "ownership" in LaunchTables)."""

    def __init__(self, capacity: int) -> None:
        self.tables = LaunchTables(capacity)
        #: NOTE (compile guards): the methods pass this int, never the tables themselves, so dynamo
        #: guards on a constant and not on the set's contents, which change as tables are built.
        self.table_set = next(_NEXT_TABLE_SET)
        _TABLE_SETS[self.table_set] = self.tables

    def __reduce__(self):
        # NOTE: a copy starts with tables of its own, empty: they are a cache, and a registered set belongs
        # to one owner. (A step plan does not even copy this object: see StepPlan.__getstate__.)
        return PlanBackend, (self.tables.capacity,)

    def grad_norm(self, grads, weights, adaptive_eta):
        return grad_norm(grads, weights, adaptive_eta, self.table_set)

    def perturb_(self, params, grads, backups, tensor_indices, norm, step, config):
        perturb_(params, grads, backups, tensor_indices, norm, step, config, self.table_set)

    def restore_(self, params, backups):
        restore_(params, backups, self.table_set)

    def gaussian_noise_(self, params, backups, scales, tensor_indices, step, config):
        gaussian_noise_(params, backups, scales, tensor_indices, step, config, self.table_set)

    def restore_sgd_step_(self, params, backups, grads, momentum_buffers, first_step, config, grad_multiplier,
                          found_inf):
        restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config, grad_multiplier,
                          found_inf, self.table_set)

    def restore_adam_step_(self, params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                           config, grad_multiplier, found_inf):
        restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, config,
                           grad_multiplier, found_inf, self.table_set)
