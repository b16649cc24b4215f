// CUDA kernels of the sam_kernels ops on the multi-tensor-apply harness (multi_tensor_apply.cuh), with
// the per-element math of csrc/include/sam_kernels/elementwise.h. Values are computed in double for float64
// tensors and in fp32 for every other storage dtype (math_t); the norm is fp32 for every dtype.
//
// NOTE (no host sync): every per-step scalar (norm, found_inf, gradient multiplier, RNG step, Adam's step
// counters) is read by the kernels from device memory, and the metadata travels as the kernel parameter, so
// no launch waits for the device and a whole SAM step can be captured in a CUDA graph.
//
// NOTE (memory access): the operand pointers are __restrict__ (the tensors of a call never overlap: NOTE
// (aliasing) in csrc/checks.h) except the parameter and its backup in the restoring kernels, which may be
// one tensor (a parameter the ascent did not perturb); every loop iteration issues all of its loads before
// its first store, so a thread's loads of one iteration are in flight together and the read-only operands
// (gradients) are read through the non-coherent path (LDG.E.128.CONSTANT in the SASS).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "sam_kernels/elementwise.h"
#include "sam_kernels/philox.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "sam_kernels' CUDA kernels need compute capability 7.0 or newer (large kernel parameters)"
#endif

namespace sam_kernels {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------- conversions

// A stored element in its math type (math_t in elementwise.h).
__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }

// A math-type value rounded to the storage type T (round to nearest even).
template <typename T>
__device__ __forceinline__ T from_math(math_t<T> x);
template <>
__device__ __forceinline__ float from_math<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_math<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_math<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One group of elements of p as values of type V: the math type, or float for the norm (a float64 element
// then rounds to nearest float, see NOTE (fp64 norm) in elementwise.h).
template <int ILP, typename V, typename T>
__device__ __forceinline__ void load(V (&r)[ILP], const T* p, int64_t i, int64_t n,
                                     bool vector) {
  T raw[ILP];
  load_raw(raw, p, i, n, vector);
#pragma unroll
  for (int j = 0; j < ILP; ++j) r[j] = static_cast<V>(to_math(raw[j]));
}

template <int ILP, typename T>
__device__ __forceinline__ void store(T* p, const math_t<T> (&r)[ILP], int64_t i, int64_t n,
                                      bool vector) {
  T raw[ILP];
#pragma unroll
  for (int j = 0; j < ILP; ++j) raw[j] = from_math<T>(r[j]);
  store_raw(p, raw, i, n, vector);
}

// Calls f(T{}) with T the device type of the dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat64:
      return f(double{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------- the norm

template <typename T, bool ADAPTIVE, int N>
__global__ void __launch_bounds__(kThreads)
    sumsq_partials_kernel(const __grid_constant__ ChunkTable<N> table, float eta,
                          float* __restrict__ partials) {
  constexpr int ILP = kIlp<T>;
  const Chunk chunk = this_chunk(table);
  const T* __restrict__ grad = operand<T>(table, 0, chunk);
  const T* __restrict__ weight = ADAPTIVE ? operand<T>(table, N - 1, chunk) : nullptr;
  const bool grad_vector = vector_aligned(grad);
  const bool weight_vector = vector_aligned(weight);
  float acc = 0.0f;
  for (int64_t i = threadIdx.x * ILP; i < chunk.length; i += kThreads * ILP) {
    const bool whole = i + ILP <= chunk.length;
    float g[ILP], w[ILP];  // NOTE (fp64 norm): float64 elements are rounded to float here
    load(g, grad, i, chunk.length, whole && grad_vector);
    if (ADAPTIVE) load(w, weight, i, chunk.length, whole && weight_vector);
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      const float t = norm_term<ADAPTIVE>(g[j], ADAPTIVE ? w[j] : 0.0f, eta);
      acc += t * t;
    }
  }
  // NOTE (determinism): fixed element-to-thread mapping, fixed tree; one partial per chunk, no atomics.
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[table.partial_offset + blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kThreads)
    finish_norm_kernel(const float* __restrict__ partials, int64_t n, float* norm, float* nonfinite) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const NormResult result = finish_norm(acc);
    *norm = result.norm;
    *nonfinite = result.nonfinite;
  }
}

// ------------------------------------------------------------------------------------------ perturb

template <typename T, bool ADAPTIVE, bool MASKED>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const __grid_constant__ ChunkTable<3> table, const float* __restrict__ norm_ptr,
                   const int64_t* __restrict__ step_ptr, const PerturbConfigT<math_t<T>> config,
                   uint32_t seed_lo, uint32_t seed_hi, uint32_t keep_threshold) {
  using C = math_t<T>;
  constexpr int ILP = kIlp<T>;
  const Chunk chunk = this_chunk(table);
  T* __restrict__ param = operand<T>(table, 0, chunk);
  const T* __restrict__ grad = operand<T>(table, 1, chunk);
  T* __restrict__ backup = operand<T>(table, 2, chunk);
  const bool param_vector = vector_aligned(param);
  const bool grad_vector = vector_aligned(grad);
  const bool backup_vector = vector_aligned(backup);
  const float norm = *norm_ptr;
  const C scale = perturb_scale(config_as<float>(config), norm);  // fp32 (NOTE (fp64 norm)), widened
  const bool finite = is_finite(norm);
  const uint64_t step = static_cast<uint64_t>(*step_ptr);
  const MaskKey key{seed_lo, seed_hi, static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                    keep_threshold};
  const uint32_t tensor_index = table.aux[chunk.row];
  for (int64_t i = threadIdx.x * ILP; i < chunk.length; i += kThreads * ILP) {
    const bool whole = i + ILP <= chunk.length;
    T raw[ILP];
    C g[ILP], w[ILP];
    load_raw(raw, param, i, chunk.length, whole && param_vector);
    load(g, grad, i, chunk.length, whole && grad_vector);
    store_raw(backup, raw, i, chunk.length, whole && backup_vector);  // the exact bits of the weight
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      // NOTE: the mask counter is the element's index within the whole tensor (chunk start included), its
      // offset in the tensor's memory (NOTE (layout) in csrc/checks.h).
      const bool keep =
          !MASKED || keep_element(key, static_cast<uint32_t>(chunk.start + i + j), tensor_index);
      w[j] = perturb_element<ADAPTIVE, C>(to_math(raw[j]), g[j], scale, config.adaptive_eta, keep, finite);
    }
    store(param, w, i, chunk.length, whole && param_vector);
  }
}

// ------------------------------------------------------------------------------------- Gaussian noise

template <typename T, bool PRECISION>
__global__ void __launch_bounds__(kThreads)
    noise_kernel(const __grid_constant__ ChunkTable<3> table, const int64_t* __restrict__ step_ptr,
                 const NoiseConfigT<math_t<T>> config, uint32_t seed_lo, uint32_t seed_hi) {
  using C = math_t<T>;
  constexpr int ILP = kIlp<T>;
  const Chunk chunk = this_chunk(table);
  T* __restrict__ param = operand<T>(table, 0, chunk);
  T* __restrict__ backup = operand<T>(table, 1, chunk);
  const T* __restrict__ scale = operand<T>(table, 2, chunk);
  const bool param_vector = vector_aligned(param);
  const bool backup_vector = vector_aligned(backup);
  const bool scale_vector = vector_aligned(scale);
  const NoiseKey key = noise_key(seed_lo, seed_hi, static_cast<uint64_t>(*step_ptr));
  const uint32_t tensor_index = table.aux[chunk.row];
  for (int64_t i = threadIdx.x * ILP; i < chunk.length; i += kThreads * ILP) {
    const bool whole = i + ILP <= chunk.length;
    T raw[ILP];
    C sc[ILP], w[ILP];
    load_raw(raw, param, i, chunk.length, whole && param_vector);
    load(sc, scale, i, chunk.length, whole && scale_vector);
    store_raw(backup, raw, i, chunk.length, whole && backup_vector);  // the exact bits of the weight
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      // NOTE: the counter is the element's index within the whole tensor (chunk start included).
      const float z = gaussian_element(key, static_cast<uint32_t>(chunk.start + i + j), tensor_index);
      w[j] = noise_element<PRECISION, C>(to_math(raw[j]), sc[j], z, config.factor);
    }
    store(param, w, i, chunk.length, whole && param_vector);
  }
}

// ------------------------------------------------------------------------------------------ restore

template <typename Bits>
__global__ void __launch_bounds__(kThreads) restore_kernel(const __grid_constant__ ChunkTable<2> table) {
  constexpr int ILP = kIlp<Bits>;
  const Chunk chunk = this_chunk(table);
  Bits* param = operand<Bits>(table, 0, chunk);         // may be the backup itself: not __restrict__
  const Bits* backup = operand<Bits>(table, 1, chunk);
  const bool param_vector = vector_aligned(param);
  const bool backup_vector = vector_aligned(backup);
  for (int64_t i = threadIdx.x * ILP; i < chunk.length; i += kThreads * ILP) {
    const bool whole = i + ILP <= chunk.length;
    Bits raw[ILP];
    load_raw(raw, backup, i, chunk.length, whole && backup_vector);
    store_raw(param, raw, i, chunk.length, whole && param_vector);
  }
}

// ----------------------------------------------------------------------------------- restore + SGD

template <typename T, bool HAS_MOMENTUM, int N>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const __grid_constant__ ChunkTable<N> table, const SgdConfigT<math_t<T>> config,
               const float* __restrict__ multiplier_ptr, const float* __restrict__ found_inf_ptr) {
  using C = math_t<T>;
  constexpr int ILP = kIlp<T>;
  const Chunk chunk = this_chunk(table);
  T* param = operand<T>(table, 0, chunk);  // may be the backup itself: neither is __restrict__
  const T* backup = operand<T>(table, 1, chunk);
  const T* __restrict__ grad = operand<T>(table, 2, chunk);
  T* __restrict__ buf = HAS_MOMENTUM ? operand<T>(table, N - 1, chunk) : nullptr;
  const bool param_vector = vector_aligned(param);
  const bool backup_vector = vector_aligned(backup);
  const bool grad_vector = vector_aligned(grad);
  const bool buf_vector = vector_aligned(buf);
  const C multiplier = multiplier_ptr != nullptr ? C(*multiplier_ptr) : C(1);
  const bool skip = found_inf_ptr != nullptr && *found_inf_ptr != 0.0f;
  const bool first_step = table.aux[chunk.row] != 0;
  for (int64_t i = threadIdx.x * ILP; i < chunk.length; i += kThreads * ILP) {
    const bool whole = i + ILP <= chunk.length;
    C w[ILP], g[ILP], b[ILP], w_out[ILP], b_out[ILP];
    load(w, backup, i, chunk.length, whole && backup_vector);
    load(g, grad, i, chunk.length, whole && grad_vector);
    if (HAS_MOMENTUM) load(b, buf, i, chunk.length, whole && buf_vector);
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      sgd_element<C>(config, w[j], effective_grad<C>(g[j], multiplier, config.maximize),
                     HAS_MOMENTUM ? b[j] : C(0), first_step, skip, w_out[j], b_out[j]);
    }
    if (HAS_MOMENTUM) store(buf, b_out, i, chunk.length, whole && buf_vector);
    store(param, w_out, i, chunk.length, whole && param_vector);
  }
}

// ---------------------------------------------------------------------------------- restore + Adam

template <typename T, bool AMSGRAD, int N>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ ChunkTable<N> table, const AdamConfigT<math_t<T>> config,
                const float* __restrict__ multiplier_ptr, const float* __restrict__ found_inf_ptr) {
  using C = math_t<T>;
  constexpr int ILP = kIlp<T>;
  const Chunk chunk = this_chunk(table);
  T* param = operand<T>(table, 0, chunk);  // may be the backup itself: neither is __restrict__
  const T* backup = operand<T>(table, 1, chunk);
  const T* __restrict__ grad = operand<T>(table, 2, chunk);
  T* __restrict__ exp_avg = operand<T>(table, 3, chunk);
  T* __restrict__ exp_avg_sq = operand<T>(table, 4, chunk);
  T* __restrict__ max_exp_avg_sq = AMSGRAD ? operand<T>(table, N - 1, chunk) : nullptr;
  const bool param_vector = vector_aligned(param);
  const bool backup_vector = vector_aligned(backup);
  const bool grad_vector = vector_aligned(grad);
  const bool exp_avg_vector = vector_aligned(exp_avg);
  const bool exp_avg_sq_vector = vector_aligned(exp_avg_sq);
  const bool max_exp_avg_sq_vector = vector_aligned(max_exp_avg_sq);
  const C multiplier = multiplier_ptr != nullptr ? C(*multiplier_ptr) : C(1);
  const bool skip = found_inf_ptr != nullptr && *found_inf_ptr != 0.0f;
  // NOTE: the step counters were advanced on the device by the op layer before this launch.
  const AdamBiasT<C> bias = adam_bias(config, *static_cast<const float*>(table.scalar[chunk.row]));
  for (int64_t i = threadIdx.x * ILP; i < chunk.length; i += kThreads * ILP) {
    const bool whole = i + ILP <= chunk.length;
    C w[ILP], g[ILP], m[ILP], v[ILP], vm[ILP];
    load(w, backup, i, chunk.length, whole && backup_vector);
    load(g, grad, i, chunk.length, whole && grad_vector);
    load(m, exp_avg, i, chunk.length, whole && exp_avg_vector);
    load(v, exp_avg_sq, i, chunk.length, whole && exp_avg_sq_vector);
    if (AMSGRAD) load(vm, max_exp_avg_sq, i, chunk.length, whole && max_exp_avg_sq_vector);
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      C w_out, m_out, v_out, vm_out;
      adam_element<C>(config, bias, w[j], effective_grad<C>(g[j], multiplier, config.maximize), m[j], v[j],
                      AMSGRAD ? vm[j] : C(0), skip, w_out, m_out, v_out, vm_out);
      w[j] = w_out;
      m[j] = m_out;
      v[j] = v_out;
      vm[j] = vm_out;
    }
    store(exp_avg, m, i, chunk.length, whole && exp_avg_vector);
    store(exp_avg_sq, v, i, chunk.length, whole && exp_avg_sq_vector);
    if (AMSGRAD) store(max_exp_avg_sq, vm, i, chunk.length, whole && max_exp_avg_sq_vector);
    store(param, w, i, chunk.length, whole && param_vector);
  }
}

// ------------------------------------------------------------------------------------------- Philox

__global__ void philox_kernel(const int64_t* __restrict__ counters, int64_t* __restrict__ out, int64_t n,
                              uint32_t key0, uint32_t key1) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t* c = counters + 4 * i;
    const U32x4 r = philox4x32_10(U32x4{static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]),
                                        static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[3])},
                                  key0, key1);
    out[4 * i] = r.x;
    out[4 * i + 1] = r.y;
    out[4 * i + 2] = r.z;
    out[4 * i + 3] = r.w;
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------- launchers

cudaError_t launch_sumsq_partials(DType dtype, const TensorLists& lists, bool adaptive, float adaptive_eta,
                                  float* partials, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (adaptive) {
      return for_each_table<2>(lists, [&](const ChunkTable<2>& table, int blocks) {
        sumsq_partials_kernel<T, true, 2><<<blocks, kThreads, 0, stream>>>(table, adaptive_eta, partials);
      });
    }
    return for_each_table<1>(lists, [&](const ChunkTable<1>& table, int blocks) {
      sumsq_partials_kernel<T, false, 1><<<blocks, kThreads, 0, stream>>>(table, adaptive_eta, partials);
    });
  });
}

cudaError_t launch_finish_norm(const float* partials, int64_t n, float* norm, float* nonfinite,
                               cudaStream_t stream) {
  finish_norm_kernel<<<1, kThreads, 0, stream>>>(partials, n, norm, nonfinite);
  return cudaGetLastError();
}

cudaError_t launch_perturb(DType dtype, const TensorLists& lists, const float* norm, const int64_t* step,
                           const PerturbConfigT<double>& config, bool adaptive, uint32_t seed_lo,
                           uint32_t seed_hi, uint32_t keep_threshold, cudaStream_t stream) {
  const bool masked = keep_threshold < kKeepAll;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const PerturbConfigT<math_t<T>> c = config_as<math_t<T>>(config);
    return for_each_table<3>(lists, [&](const ChunkTable<3>& table, int blocks) {
      if (adaptive && masked) {
        perturb_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(table, norm, step, c, seed_lo, seed_hi,
                                                                       keep_threshold);
      } else if (adaptive) {
        perturb_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(table, norm, step, c, seed_lo,
                                                                        seed_hi, keep_threshold);
      } else if (masked) {
        perturb_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(table, norm, step, c, seed_lo,
                                                                        seed_hi, keep_threshold);
      } else {
        perturb_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(table, norm, step, c, seed_lo,
                                                                         seed_hi, keep_threshold);
      }
    });
  });
}

cudaError_t launch_noise(DType dtype, const TensorLists& lists, const int64_t* step,
                         const NoiseConfigT<double>& config, uint32_t seed_lo, uint32_t seed_hi,
                         cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const NoiseConfigT<math_t<T>> c = config_as<math_t<T>>(config);
    return for_each_table<3>(lists, [&](const ChunkTable<3>& table, int blocks) {
      if (c.precision) {
        noise_kernel<T, true><<<blocks, kThreads, 0, stream>>>(table, step, c, seed_lo, seed_hi);
      } else {
        noise_kernel<T, false><<<blocks, kThreads, 0, stream>>>(table, step, c, seed_lo, seed_hi);
      }
    });
  });
}

cudaError_t launch_restore(int element_size, const TensorLists& lists, cudaStream_t stream) {
  if (element_size != 2 && element_size != 4 && element_size != 8) return cudaErrorInvalidValue;
  return for_each_table<2>(lists, [&](const ChunkTable<2>& table, int blocks) {
    if (element_size == 2) {
      restore_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(table);
    } else if (element_size == 4) {
      restore_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(table);
    } else {
      restore_kernel<uint64_t><<<blocks, kThreads, 0, stream>>>(table);
    }
  });
}

cudaError_t launch_sgd(DType dtype, const TensorLists& lists, const SgdConfigT<double>& config,
                       const float* multiplier, const float* found_inf, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const SgdConfigT<math_t<T>> c = config_as<math_t<T>>(config);
    if (c.has_momentum) {
      return for_each_table<4>(lists, [&](const ChunkTable<4>& table, int blocks) {
        sgd_kernel<T, true, 4><<<blocks, kThreads, 0, stream>>>(table, c, multiplier, found_inf);
      });
    }
    return for_each_table<3>(lists, [&](const ChunkTable<3>& table, int blocks) {
      sgd_kernel<T, false, 3><<<blocks, kThreads, 0, stream>>>(table, c, multiplier, found_inf);
    });
  });
}

cudaError_t launch_adam(DType dtype, const TensorLists& lists, const AdamConfigT<double>& config,
                        const float* multiplier, const float* found_inf, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const AdamConfigT<math_t<T>> c = config_as<math_t<T>>(config);
    if (c.amsgrad) {
      return for_each_table<6>(lists, [&](const ChunkTable<6>& table, int blocks) {
        adam_kernel<T, true, 6><<<blocks, kThreads, 0, stream>>>(table, c, multiplier, found_inf);
      });
    }
    return for_each_table<5>(lists, [&](const ChunkTable<5>& table, int blocks) {
      adam_kernel<T, false, 5><<<blocks, kThreads, 0, stream>>>(table, c, multiplier, found_inf);
    });
  });
}

cudaError_t launch_philox(const int64_t* counters, int64_t* out, int64_t n, uint32_t key0, uint32_t key1,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  philox_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(counters, out, n, key0, key1);
  return cudaGetLastError();
}

#define SAMK_CUDA_STR2(...) #__VA_ARGS__
#define SAMK_CUDA_STR(...) SAMK_CUDA_STR2(__VA_ARGS__)

std::string compiled_arch_list() {
  // NOTE: nvcc (11.5+) defines __CUDA_ARCH_LIST__ in every compilation pass, host pass included, as the
  // comma-separated list of the architectures the device code is built for ("800,900").
#ifdef __CUDA_ARCH_LIST__
  const std::string raw = SAMK_CUDA_STR(__CUDA_ARCH_LIST__);
#else
  const std::string raw;
#endif
  std::string out;
  size_t begin = 0;
  while (begin < raw.size()) {
    size_t end = raw.find(',', begin);
    if (end == std::string::npos) end = raw.size();
    const std::string arch = raw.substr(begin, end - begin);
    if (!arch.empty()) {
      if (!out.empty()) out += ",";
      out += "sm_" + arch.substr(0, arch.size() - 1);  // 800 -> sm_80, 1000 -> sm_100
    }
    begin = end + 1;
  }
  return out;
}

std::string compiled_cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace cuda
}  // namespace sam_kernels
