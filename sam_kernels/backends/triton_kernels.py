"""Triton kernels of the multi-tensor SAM ops; the launch glue is in ``triton_backend.py``.

NOTE (multi-tensor layout): one launch covers every tensor of one dtype group. Program ``pid`` works on
one chunk of one tensor, found through two tables built by the glue: ``chunk_tensor[pid]`` (the tensor's
row in the group) and ``chunk_start[pid]`` (the chunk's first element). Tensor addresses live in int64
pointer tables (one row per tensor list) that the kernel casts back to typed pointers. Every chunk is
``CHUNK`` elements except a tensor's last one; empty tensors own no chunk. Math runs in ``COMPUTE``:
fp32 for every dtype but float64, which computes in fp64 (see "fp64" in ``common.py``); values are cast
right after loading (the Triton interpreter also computes bf16 wrongly otherwise).

NOTE (scalars): the float options arrive as fp64 kernel arguments (annotated ``tl.float64``), computed
on the host in double where they are derived (1 - dampening, 1 - beta, 1 - lr * weight_decay), and are
rounded to ``COMPUTE`` once in the kernel, as the native kernels and the reference round them.

NOTE (aligned fast path): when every operand's base address is 16-byte aligned (``ALIGNED``, checked by
the glue when it builds the tables), the pointers carry that as a ``tl.multiple_of`` hint and a chunk's
whole blocks run unmasked, so each thread moves 16 bytes per access (``ld.global.v4.b32`` for every
dtype); only the chunk's last, partial block is masked. Chunk starts are multiples of ``CHUNK`` elements.
The math is the same on both paths.

NOTE (no host sync): every per-step scalar (norm, found-inf flag, gradient multiplier, RNG step, Adam
step counters) is read from device memory inside the kernel, so no launch waits on the host.
"""

import triton
import triton.language as tl


@triton.jit
def _typed_ptr(table, row, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address stored at ``table[row]`` as a pointer to DTYPE (16-byte aligned when ALIGNED)."""
    pointer = tl.load(table + row).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _scalar(value, DTYPE: tl.constexpr):
    """A float argument rounded to DTYPE. NOTE: tl.full, not tl.cast: the interpreter passes float
    arguments as Python floats, which a cast would take as fp32 first; full converts the value itself."""
    return tl.full([], value, DTYPE)


@triton.jit
def _div(a, b):
    """a / b rounded to nearest. NOTE (IEEE division): fp32 `/` lowers to approximate division on NVIDIA
    GPUs, hence tl.div_rn; fp64 `/` is IEEE already (and div_rn takes fp32 only)."""
    return a / b if b.dtype.is_fp64() else tl.div_rn(a, b)


@triton.jit
def _sqrt(x):
    """sqrt(x) rounded to nearest (fp32 tl.sqrt is approximate on NVIDIA GPUs; fp64's is IEEE)."""
    return tl.sqrt(x) if x.dtype.is_fp64() else tl.sqrt_rn(x)


@triton.jit
def _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor row, first element, end of the whole blocks, end element) of this program's chunk."""
    pid = tl.program_id(0)
    row = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
    end = tl.minimum(start + CHUNK, tl.load(numels + row))
    return row, start, start + (end - start) // BLOCK * BLOCK, end


@triton.jit
def _load(pointer, offs, inside, TAIL: tl.constexpr):
    """A block's values: unmasked on whole blocks, masked (zeros outside) on the tail."""
    return tl.load(pointer + offs, mask=inside, other=0.0) if TAIL else tl.load(pointer + offs)


@triton.jit
def _store(pointer, offs, values, inside, TAIL: tl.constexpr):
    if TAIL:
        tl.store(pointer + offs, values, mask=inside)
    else:
        tl.store(pointer + offs, values)


@triton.jit(do_not_specialize=["partial_offset", "adaptive_eta"])
def sumsq_partials_kernel(
    grad_ptrs, weight_ptrs, numels, chunk_tensor, chunk_start, partials, partial_offset, adaptive_eta,
    GRAD_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Stage 1 of the global norm: partials[partial_offset + pid] = sum over the chunk of (T_w g)^2.

    NOTE (determinism): each chunk's sum is a fixed-shape tree reduction and the partials are summed in
    index order by ``finish_norm_kernel``; no atomics, so the same input always gives the same bits.
    """
    row, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    grad = _typed_ptr(grad_ptrs, row, GRAD_DTYPE, ALIGNED)
    weight = _typed_ptr(weight_ptrs, row, WEIGHT_DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in range(start, full_end, BLOCK):
        offs = tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)
        acc += _sumsq_block(grad, weight, offs, end, adaptive_eta, ADAPTIVE, False)
    if full_end < end:
        acc += _sumsq_block(grad, weight, full_end + tl.arange(0, BLOCK), end, adaptive_eta, ADAPTIVE,
                            True)
    tl.store(partials + partial_offset + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _sumsq_block(grad, weight, offs, end, adaptive_eta, ADAPTIVE: tl.constexpr, TAIL: tl.constexpr):
    inside = offs < end
    g = _load(grad, offs, inside, TAIL).to(tl.float32)
    if ADAPTIVE:
        w = _load(weight, offs, inside, TAIL).to(tl.float32)
        g = (tl.abs(w) + adaptive_eta) * g
    return g * g


@triton.jit(do_not_specialize=["n_partials"])
def finish_norm_kernel(partials, n_partials, norm_out, nonfinite_out, BLOCK: tl.constexpr):
    """Stage 2 (one program): norm = sqrt(sum of partials) and a 0/1 flag for a non-finite norm."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in range(0, n_partials, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n_partials, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(norm_out, tl.sqrt_rn(total))
    # NOTE: x - x is 0 for every finite x and NaN for +-inf and NaN.
    tl.store(nonfinite_out, tl.where(total - total == 0.0, 0.0, 1.0))


@triton.jit
def _keep_mask(offs, tensor_id, step_lo, step_hi, seed_lo, seed_hi, keep_threshold, BLOCK: tl.constexpr):
    """Bernoulli keep-mask; the counter layout is documented in ``backends/common.py``."""
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    r, _, _, _ = tl.philox_impl(
        offs.to(tl.uint32), zero + tensor_id.to(tl.uint32), zero + step_lo, zero + step_hi,
        seed_lo, seed_hi, 10,
    )
    return (r >> 8).to(tl.int32) < keep_threshold


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "keep_threshold"])
def perturb_kernel(
    param_ptrs, grad_ptrs, backup_ptrs, numels, tensor_ids, chunk_tensor, chunk_start,
    norm_ptr, step_ptr, rho: tl.float64, eps: tl.float64, scale_factor: tl.float64,
    adaptive_eta: tl.float64, seed_lo, seed_hi, keep_threshold,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, NORMALIZE: tl.constexpr,
    ADAPTIVE: tl.constexpr, MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """backup = w; w += scale * mask * (T_w^2 if ADAPTIVE) * g, scale = rho / (norm + eps) * scale_factor.

    A non-finite norm leaves w as it was (the backup is still written).
    """
    row, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    param = _typed_ptr(param_ptrs, row, PARAM_DTYPE, ALIGNED)
    grad = _typed_ptr(grad_ptrs, row, GRAD_DTYPE, ALIGNED)
    backup = _typed_ptr(backup_ptrs, row, PARAM_DTYPE, ALIGNED)
    norm = tl.load(norm_ptr)
    finite = norm - norm == 0.0
    rho = _scalar(rho, tl.float32)
    scale_factor = _scalar(scale_factor, tl.float32)
    # NOTE (IEEE division): tl.div_rn, not `/`, which lowers to approximate division on NVIDIA GPUs.
    # The scale is fp32 for every dtype, 1 / (norm + eps) * rho as the reference computes rho / t.
    if NORMALIZE:
        scale = tl.div_rn(1.0, norm + _scalar(eps, tl.float32)) * rho * scale_factor
    else:
        scale = rho * scale_factor
    scale = scale.to(COMPUTE)
    adaptive_eta = _scalar(adaptive_eta, COMPUTE)
    step = tl.load(step_ptr)
    step_lo = (step & 0xFFFFFFFF).to(tl.uint32)
    step_hi = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    tensor_id = tl.load(tensor_ids + row)
    key = (tensor_id, step_lo, step_hi, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), keep_threshold)
    for block_start in range(start, full_end, BLOCK):
        offs = tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)
        _perturb_block(param, grad, backup, offs, end, scale, finite, adaptive_eta, key, PARAM_DTYPE,
                       COMPUTE, ADAPTIVE, MASKED, BLOCK, False)
    if full_end < end:
        _perturb_block(param, grad, backup, full_end + tl.arange(0, BLOCK), end, scale, finite,
                       adaptive_eta, key, PARAM_DTYPE, COMPUTE, ADAPTIVE, MASKED, BLOCK, True)


@triton.jit
def _perturb_block(param, grad, backup, offs, end, scale, finite, adaptive_eta, key,
                   PARAM_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ADAPTIVE: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    inside = offs < end
    w_raw = _load(param, offs, inside, TAIL)
    g_raw = _load(grad, offs, inside, TAIL)
    _store(backup, offs, w_raw, inside, TAIL)
    w = w_raw.to(COMPUTE)
    e = scale * g_raw.to(COMPUTE)
    if ADAPTIVE:
        t = tl.abs(w) + adaptive_eta
        e = e * t * t
    if MASKED:
        tensor_id, step_lo, step_hi, seed_lo, seed_hi, keep_threshold = key
        keep = _keep_mask(offs, tensor_id, step_lo, step_hi, seed_lo, seed_hi, keep_threshold, BLOCK)
        e = tl.where(keep, e, 0.0)
    w_new = tl.where(finite, w + e, w)
    _store(param, offs, w_new.to(PARAM_DTYPE), inside, TAIL)


@triton.jit
def _box_muller(r0, r1):
    """The standard normal of the noise contract (``backends/common.py``) from two uint32 Philox words, in
    float32, in the contract's order. NOTE (rounding): the launch passes ``enable_fp_fusion=False`` (no
    FMA contraction on a GPU) and division and sqrt are the correctly rounded ``div_rn``/``sqrt_rn``; the
    constants are the float32 values of ``NOISE_CONSTANTS`` written out (each decimal is that float32
    value exactly)."""
    n = ((r0 >> 8) + 1).to(tl.float32)
    bits = n.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    high = m > 1.4142135381698608  # SQRT2
    m = tl.where(high, m * 0.5, m)
    e = tl.where(high, e + 1, e)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    t = s + s
    poly = s2 * 0.1111111119389534 + 0.1428571492433548  # LOG_C9, LOG_C7
    poly = poly * s2 + 0.20000000298023224  # LOG_C5
    poly = poly * s2 + 0.3333333432674408  # LOG_C3
    ln_u = (e - 24).to(tl.float32) * 0.6931471824645996 + (t + t * (s2 * poly))  # LN2
    radius = tl.sqrt_rn(ln_u * -2.0)
    v = r1 >> 8
    quadrant = v >> 22
    w = v & 0x3FFFFF
    upper = w >= (1 << 21)
    k = tl.where(upper, (1 << 22) - w, w)
    x = k.to(tl.float32) * 3.7450703871400037e-07  # ANGLE_STEP
    x2 = x * x
    cos = x2 * -2.755731998149713e-07 + 2.4801587642286904e-05  # COS_C10, COS_C8
    cos = cos * x2 + -0.0013888889225199819  # COS_C6
    cos = cos * x2 + 0.0416666679084301  # COS_C4
    cos = cos * x2 + -0.5  # COS_C2
    cos = cos * x2 + 1.0
    sin = x2 * 2.7557318844628753e-06 + -0.00019841270113829523  # SIN_C9, SIN_C7
    sin = sin * x2 + 0.008333333767950535  # SIN_C5
    sin = sin * x2 + -0.1666666716337204  # SIN_C3
    sin = x + x * (x2 * sin)
    value = tl.where(((quadrant & 1) != 0) != upper, sin, cos)
    value = tl.where((((quadrant + 1) >> 1) & 1) != 0, -value, value)
    return radius * value


@triton.jit
def _gaussian(offs, tensor_id, step_lo, step_hi, seed_lo, seed_hi, BLOCK: tl.constexpr):
    """The contract's standard normals of a block: Philox words 0 and 1 of the noise stream (the step's
    high word tagged, see ``backends/common.py``)."""
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    r0, r1, _, _ = tl.philox_impl(
        offs.to(tl.uint32), zero + tensor_id.to(tl.uint32), zero + step_lo, zero + step_hi,
        seed_lo, seed_hi, 10,
    )
    return _box_muller(r0, r1)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def noise_kernel(
    param_ptrs, backup_ptrs, scale_ptrs, numels, tensor_ids, chunk_tensor, chunk_start, step_ptr,
    factor: tl.float64, seed_lo, seed_hi,
    PARAM_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """backup = w; w += z / sqrt(factor * scale) (PRECISION) or w += (factor * scale) * z, z the noise
    contract's float32 normal widened to COMPUTE."""
    row, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    param = _typed_ptr(param_ptrs, row, PARAM_DTYPE, ALIGNED)
    backup = _typed_ptr(backup_ptrs, row, PARAM_DTYPE, ALIGNED)
    scale = _typed_ptr(scale_ptrs, row, PARAM_DTYPE, ALIGNED)
    factor = _scalar(factor, COMPUTE)
    step = tl.load(step_ptr)
    step_lo = (step & 0xFFFFFFFF).to(tl.uint32)
    step_hi = (((step >> 32) & 0xFFFFFFFF) | 0x80000000).to(tl.uint32)  # the noise stream's tag
    tensor_id = tl.load(tensor_ids + row)
    key = (tensor_id, step_lo, step_hi, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    for block_start in range(start, full_end, BLOCK):
        offs = tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)
        _noise_block(param, backup, scale, offs, end, factor, key, PARAM_DTYPE, COMPUTE, PRECISION, BLOCK,
                     False)
    if full_end < end:
        _noise_block(param, backup, scale, full_end + tl.arange(0, BLOCK), end, factor, key, PARAM_DTYPE,
                     COMPUTE, PRECISION, BLOCK, True)


@triton.jit
def _noise_block(param, backup, scale, offs, end, factor, key, PARAM_DTYPE: tl.constexpr,
                 COMPUTE: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    inside = offs < end
    w_raw = _load(param, offs, inside, TAIL)
    _store(backup, offs, w_raw, inside, TAIL)
    spread = factor * _load(scale, offs, inside, TAIL).to(COMPUTE)
    if TAIL:
        spread = tl.where(inside, spread, 1.0)  # no 1 / sqrt(0) outside the tensor
    tensor_id, step_lo, step_hi, seed_lo, seed_hi = key
    z = _gaussian(offs, tensor_id, step_lo, step_hi, seed_lo, seed_hi, BLOCK).to(COMPUTE)
    delta = _div(z, _sqrt(spread)) if PRECISION else spread * z
    _store(param, offs, _rounded(w_raw.to(COMPUTE) + delta, PARAM_DTYPE), inside, TAIL)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """``x`` rounded to DTYPE, to nearest even. NOTE (interpreter bfloat16): the Triton interpreter
    truncates float32 to bfloat16, so that rounding is done here with integer operations (the same result
    as a GPU's conversion; NaN stays NaN), which keeps the noisy bfloat16 weights the other backends'."""
    if DTYPE.is_bf16():
        bits = x.to(tl.uint32, bitcast=True)
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nearest = tl.where(x != x, (bits >> 16) | 0x40, nearest)
        return nearest.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def restore_kernel(param_ptrs, backup_ptrs, numels, chunk_tensor, chunk_start,
                   PARAM_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """w = backup, bit for bit (a raw copy, no conversion)."""
    row, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    param = _typed_ptr(param_ptrs, row, PARAM_DTYPE, ALIGNED)
    backup = _typed_ptr(backup_ptrs, row, PARAM_DTYPE, ALIGNED)
    for block_start in range(start, full_end, BLOCK):
        offs = tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)
        _store(param, offs, _load(backup, offs, offs < end, False), offs < end, False)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _store(param, offs, _load(backup, offs, offs < end, True), offs < end, True)


@triton.jit
def _step_scalars(multiplier_ptr, found_inf_ptr, COMPUTE: tl.constexpr, HAS_MULTIPLIER: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr):
    """(gradient multiplier, skip flag) read from device memory, or (1, False) when absent."""
    multiplier = _scalar(1.0, COMPUTE)
    if HAS_MULTIPLIER:
        multiplier = tl.load(multiplier_ptr).to(COMPUTE)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    return multiplier, skip


@triton.jit
def restore_sgd_kernel(
    param_ptrs, backup_ptrs, grad_ptrs, buf_ptrs, numels, first_step, chunk_tensor, chunk_start,
    multiplier_ptr, found_inf_ptr, lr: tl.float64, momentum: tl.float64,
    one_minus_dampening: tl.float64, weight_decay: tl.float64,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_MULTIPLIER: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """w = backup, then torch.optim.SGD's step with the second gradient, in one pass.

    NOTE: weight decay uses the restored weights; without it (HAS_WEIGHT_DECAY false) the term is not
    computed at all, so an infinite weight does not turn into 0 * inf = NaN. On found-inf the weights are
    restored and the momentum buffer is left as it was.
    """
    row, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    param = _typed_ptr(param_ptrs, row, PARAM_DTYPE, ALIGNED)
    backup = _typed_ptr(backup_ptrs, row, PARAM_DTYPE, ALIGNED)
    grad = _typed_ptr(grad_ptrs, row, GRAD_DTYPE, ALIGNED)
    buf = _typed_ptr(buf_ptrs, row, PARAM_DTYPE, ALIGNED)
    multiplier, skip = _step_scalars(multiplier_ptr, found_inf_ptr, COMPUTE, HAS_MULTIPLIER, HAS_FOUND_INF)
    is_first = tl.load(first_step + row) != 0
    options = (_scalar(lr, COMPUTE), _scalar(momentum, COMPUTE), _scalar(one_minus_dampening, COMPUTE),
               _scalar(weight_decay, COMPUTE), multiplier, skip, is_first)
    for block_start in range(start, full_end, BLOCK):
        offs = tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)
        _sgd_block(param, backup, grad, buf, offs, end, options, PARAM_DTYPE, COMPUTE, HAS_MOMENTUM,
                   HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, False)
    if full_end < end:
        _sgd_block(param, backup, grad, buf, full_end + tl.arange(0, BLOCK), end, options, PARAM_DTYPE,
                   COMPUTE, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, True)


@triton.jit
def _sgd_block(param, backup, grad, buf, offs, end, options, PARAM_DTYPE: tl.constexpr,
               COMPUTE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, TAIL: tl.constexpr):
    lr, momentum, one_minus_dampening, weight_decay, multiplier, skip, is_first = options
    inside = offs < end
    w = _load(backup, offs, inside, TAIL).to(COMPUTE)
    g = _load(grad, offs, inside, TAIL).to(COMPUTE) * multiplier
    if HAS_MOMENTUM:
        old = _load(buf, offs, inside, TAIL).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g += weight_decay * w
    if HAS_MOMENTUM:
        new = tl.where(is_first, g, momentum * old + one_minus_dampening * g)
        _store(buf, offs, tl.where(skip, old, new).to(PARAM_DTYPE), inside, TAIL)
        g = g + momentum * new if NESTEROV else new
    w_new = tl.where(skip, w, w - lr * g)
    _store(param, offs, w_new.to(PARAM_DTYPE), inside, TAIL)


@triton.jit
def restore_adam_kernel(
    param_ptrs, backup_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs, step_ptrs,
    numels, chunk_tensor, chunk_start, multiplier_ptr, found_inf_ptr,
    lr: tl.float64, beta1: tl.float64, beta2: tl.float64, one_minus_beta1: tl.float64,
    one_minus_beta2: tl.float64, eps: tl.float64,
    weight_decay: tl.float64, decay_factor: tl.float64,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_MULTIPLIER: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """w = backup, then torch.optim.Adam's (AdamW's when DECOUPLED) step, in one pass.

    NOTE (bias corrections): the per-tensor step counters were advanced by the glue before the launch (by
    0 on found-inf). beta^step (beta as rounded to COMPUTE) is computed by squaring in fp64 and rounded
    to COMPUTE: for fp32 tensors the reference's pow after rounding, for fp64 ones within about
    step * 2**-53 of it (5e-13 at step 1e5), where an fp32 exp2 (an approximate instruction on NVIDIA
    GPUs) loses about 1e-4 of the early bias corrections to the cancellation in 1 - beta^step, and an
    fp64 exp2 costs registers enough to spill.
    """
    row, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    param = _typed_ptr(param_ptrs, row, PARAM_DTYPE, ALIGNED)
    backup = _typed_ptr(backup_ptrs, row, PARAM_DTYPE, ALIGNED)
    grad = _typed_ptr(grad_ptrs, row, GRAD_DTYPE, ALIGNED)
    exp_avg = _typed_ptr(exp_avg_ptrs, row, PARAM_DTYPE, ALIGNED)
    exp_avg_sq = _typed_ptr(exp_avg_sq_ptrs, row, PARAM_DTYPE, ALIGNED)
    max_exp_avg_sq = _typed_ptr(max_exp_avg_sq_ptrs, row, PARAM_DTYPE, ALIGNED)
    multiplier, skip = _step_scalars(multiplier_ptr, found_inf_ptr, COMPUTE, HAS_MULTIPLIER, HAS_FOUND_INF)
    step = tl.load(_typed_ptr(step_ptrs, row, tl.float32, False))
    one = _scalar(1.0, COMPUTE)
    beta1_power, beta2_power = _powers(_scalar(beta1, COMPUTE).to(tl.float64),
                                       _scalar(beta2, COMPUTE).to(tl.float64), step)
    beta1_power, beta2_power = beta1_power.to(COMPUTE), beta2_power.to(COMPUTE)
    step_size = _div(one, one - beta1_power) * _scalar(lr, COMPUTE)
    bias_correction2_sqrt = _sqrt(one - beta2_power)
    pointers = (param, backup, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    options = (_scalar(beta1, COMPUTE), _scalar(beta2, COMPUTE), _scalar(one_minus_beta1, COMPUTE),
               _scalar(one_minus_beta2, COMPUTE), _scalar(eps, COMPUTE), _scalar(weight_decay, COMPUTE),
               _scalar(decay_factor, COMPUTE), multiplier, skip, step_size, bias_correction2_sqrt)
    for block_start in range(start, full_end, BLOCK):
        offs = tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)
        _adam_block(pointers, offs, end, options, PARAM_DTYPE, COMPUTE, HAS_WEIGHT_DECAY, DECOUPLED,
                    AMSGRAD, MAXIMIZE, False)
    if full_end < end:
        _adam_block(pointers, full_end + tl.arange(0, BLOCK), end, options, PARAM_DTYPE, COMPUTE,
                    HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, True)


@triton.jit
def _powers(base1, base2, exponent):
    """(base1 ** exponent, base2 ** exponent) for a whole, non-negative exponent (Adam's step counter), by
    squaring in fp64 (IEEE multiplies only; relative error near exponent * 2**-53), both in one loop."""
    power1 = tl.full([], 1.0, tl.float64)
    power2 = tl.full([], 1.0, tl.float64)
    remaining = exponent.to(tl.int64)
    while remaining > 0:
        if remaining % 2 == 1:
            power1 = power1 * base1
            power2 = power2 * base2
        base1 = base1 * base1
        base2 = base2 * base2
        remaining = remaining // 2
    return power1, power2


@triton.jit
def _adam_block(pointers, offs, end, options, PARAM_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, TAIL: tl.constexpr):
    param, backup, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = pointers
    (beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_factor, multiplier, skip,
     step_size, bias_correction2_sqrt) = options
    inside = offs < end
    w = _load(backup, offs, inside, TAIL).to(COMPUTE)
    g = _load(grad, offs, inside, TAIL).to(COMPUTE) * multiplier
    if MAXIMIZE:
        g = -g
    w_decayed = w
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            w_decayed = w * decay_factor
        else:
            g += weight_decay * w
    m_old = _load(exp_avg, offs, inside, TAIL).to(COMPUTE)
    v_old = _load(exp_avg_sq, offs, inside, TAIL).to(COMPUTE)
    m = beta1 * m_old + one_minus_beta1 * g
    v = beta2 * v_old + one_minus_beta2 * g * g
    _store(exp_avg, offs, tl.where(skip, m_old, m).to(PARAM_DTYPE), inside, TAIL)
    _store(exp_avg_sq, offs, tl.where(skip, v_old, v).to(PARAM_DTYPE), inside, TAIL)
    if AMSGRAD:
        v_max_old = _load(max_exp_avg_sq, offs, inside, TAIL).to(COMPUTE)
        # NOTE: NaN propagates, as torch.maximum (the reference) and the native kernels do.
        v_max = tl.maximum(v_max_old, v, propagate_nan=tl.PropagateNan.ALL)
        _store(max_exp_avg_sq, offs, tl.where(skip, v_max_old, v_max).to(PARAM_DTYPE), inside, TAIL)
        denom = _div(_sqrt(v_max), bias_correction2_sqrt) + eps
    else:
        denom = _div(_sqrt(v), bias_correction2_sqrt) + eps
    w_new = tl.where(skip, w, w_decayed - _div(step_size * m, denom))
    _store(param, offs, w_new.to(PARAM_DTYPE), inside, TAIL)
