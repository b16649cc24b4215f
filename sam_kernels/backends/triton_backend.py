"""Launch glue of the Triton backend: metadata tables, one launch per op per dtype group.

The kernels themselves are in ``triton_kernels.py``. Inputs arrive validated by ``sam_kernels.ops``
(one device, supported dtypes, dense layouts shared by each parameter's companions, no missing
gradients). A dense tensor is one flat array from its data pointer (see "layout" in ``common.py``).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton.language as tl

from . import triton_kernels as kernels
from .common import AdamConfig, PerturbConfig, SgdConfig, compute_dtype, group_by_dtype, split_u64

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
        if len(self) > self.capacity:
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


def grad_norm(grads, weights, adaptive_eta, tables: LaunchTables | None = None):
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


def perturb_(params, grads, backups, tensor_indices, norm, step, config: PerturbConfig,
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


def restore_(params, backups, tables: LaunchTables | None = None) -> None:
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


def restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config: SgdConfig,
                      grad_multiplier, found_inf, tables: LaunchTables | None = None) -> None:
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
                *_optional_scalars(meta, grad_multiplier, found_inf),
                float(config.lr), float(config.momentum), 1.0 - float(config.dampening),
                float(config.weight_decay),
                PARAM_DTYPE=TL_DTYPES[group_params[0].dtype], GRAD_DTYPE=TL_DTYPES[grads[group[0]].dtype],
                COMPUTE=_compute(group_params[0].dtype), HAS_MOMENTUM=has_momentum,
                HAS_WEIGHT_DECAY=config.weight_decay != 0, NESTEROV=config.nesterov,
                MAXIMIZE=config.maximize,
                HAS_MULTIPLIER=grad_multiplier is not None, HAS_FOUND_INF=found_inf is not None,
                CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=meta.aligned,
                num_warps=num_warps(group_params[0].dtype),
            )


def restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                       config: AdamConfig, grad_multiplier, found_inf,
                       tables: LaunchTables | None = None) -> None:
    amsgrad, beta1, beta2 = config.amsgrad, config.beta1, config.beta2
    with _device_guard(params[0].device):
        for group in group_by_dtype(params):
            group_params = _pick(params, group)
            max_sqs = _pick(max_exp_avg_sqs, group) if amsgrad else _pick(exp_avg_sqs, group)
            meta = _metadata([group_params, _pick(backups, group), _pick(grads, group),
                              _pick(exp_avgs, group), _pick(exp_avg_sqs, group), max_sqs,
                              _pick(steps, group)], tables=tables)
            if meta.n_chunks == 0:
                continue
            dtype = group_params[0].dtype
            lr, weight_decay = float(config.lr), float(config.weight_decay)
            kernels.restore_adam_kernel[(meta.n_chunks,)](
                *meta.pointers, meta.numels, meta.chunk_tensor, meta.chunk_start,
                *_optional_scalars(meta, grad_multiplier, found_inf),
                lr, float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, _log2(beta1, dtype),
                _log2(beta2, dtype), float(config.eps), weight_decay, 1.0 - lr * weight_decay,
                PARAM_DTYPE=TL_DTYPES[dtype], GRAD_DTYPE=TL_DTYPES[grads[group[0]].dtype],
                COMPUTE=_compute(dtype), HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=config.decoupled,
                AMSGRAD=amsgrad, MAXIMIZE=config.maximize,
                HAS_MULTIPLIER=grad_multiplier is not None, HAS_FOUND_INF=found_inf is not None,
                CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=meta.aligned,
                num_warps=num_warps(group_params[0].dtype),
            )


def _log2(beta: float, dtype: torch.dtype) -> float:
    """log2 of beta as the element math rounds it (to fp32 unless the tensors are float64)."""
    rounded = beta if dtype == torch.float64 else struct.unpack("f", struct.pack("f", beta))[0]
    return math.log2(rounded) if rounded > 0 else -math.inf


def _compute(dtype: torch.dtype):
    return TL_DTYPES[compute_dtype(dtype)]


# NOTE (torch.compile): the launches build their metadata tables from data pointers, which fake tensors
# do not have, and the interpreter cannot be traced; until the ops are registered with
# torch.library.triton_op, dynamo runs each op as one untraced call (a graph break per op, stable from
# step to step, so a compiled step does not recompile).
grad_norm = torch.compiler.disable(grad_norm)
perturb_ = torch.compiler.disable(perturb_)
restore_ = torch.compiler.disable(restore_)
restore_sgd_step_ = torch.compiler.disable(restore_sgd_step_)
restore_adam_step_ = torch.compiler.disable(restore_adam_step_)


class PlanBackend:
    """The backend interface over a step plan's own launch tables (see "ownership" in LaunchTables)."""

    def __init__(self, capacity: int) -> None:
        self.tables = LaunchTables(capacity)

    def grad_norm(self, grads, weights, adaptive_eta):
        return grad_norm(grads, weights, adaptive_eta, self.tables)

    def perturb_(self, params, grads, backups, tensor_indices, norm, step, config):
        perturb_(params, grads, backups, tensor_indices, norm, step, config, self.tables)

    def restore_(self, params, backups):
        restore_(params, backups, self.tables)

    def restore_sgd_step_(self, params, backups, grads, momentum_buffers, first_step, config, grad_multiplier,
                          found_inf):
        restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config, grad_multiplier,
                          found_inf, self.tables)

    def restore_adam_step_(self, params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                           config, grad_multiplier, found_inf):
        restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, config,
                           grad_multiplier, found_inf, self.tables)
