// CPU implementations of the sam_kernels ops: parallel over (tensor, chunk) work items with
// at::parallel_for (torch's own OpenMP pool), vectorized inner loops, the per-element math of
// csrc/include/sam_kernels/elementwise.h (the same code the CUDA kernels run), in double for float64
// tensors and in float for the others. Every loop walks a tensor's memory as a flat array (see NOTE
// (layout) in csrc/checks.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "checks.h"
#include "sam_kernels/elementwise.h"
#include "sam_kernels/philox.h"

namespace sam_kernels {
namespace {

// ------------------------------------------------------------------------------------------ utilities

// NOTE (instruction sets): the per-chunk loops stay out of line, and on x86-64 ELF targets GCC compiles
// (11+) each of them three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline (SSE2); the
// dynamic loader picks the best clone for the running CPU once (an ifunc). The build itself stays portable.
// FMA contraction is off (-ffp-contract=off), so every clone rounds exactly like the baseline.
#if defined(__GNUC__) && __GNUC__ >= 11 && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#if !defined(SAMK_NO_TARGET_CLONES)
#define SAMK_CPU_LOOP __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef SAMK_CPU_LOOP
#if defined(_MSC_VER)
#define SAMK_CPU_LOOP __declspec(noinline)
#else
#define SAMK_CPU_LOOP __attribute__((noinline))
#endif
#endif

// NOTE (vectorization): half and bfloat16 elements are converted through their 16-bit payload (`.x`)
// with c10's bit-level conversions, never by copying the c10 structs, which the vectorizer cannot handle.
// Rounding is to nearest even, as in Tensor.copy_ from float32. (The 16-bit narrowing needs SSE4.1, so
// half/bfloat16 loops vectorize in the AVX2 and AVX-512 clones only.)
SAMK_INLINE float load(const float* p, int64_t i) { return p[i]; }
SAMK_INLINE double load(const double* p, int64_t i) { return p[i]; }
SAMK_INLINE float load(const c10::Half* p, int64_t i) {
  return c10::detail::fp16_ieee_to_fp32_value(p[i].x);
}
SAMK_INLINE float load(const c10::BFloat16* p, int64_t i) {
  return c10::detail::f32_from_bits(p[i].x);
}

SAMK_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
SAMK_INLINE void store(double* p, int64_t i, double v) { p[i] = v; }
SAMK_INLINE void store(c10::Half* p, int64_t i, float v) {
  p[i].x = c10::detail::fp16_ieee_from_fp32_value(v);
}
SAMK_INLINE void store(c10::BFloat16* p, int64_t i, float v) {
  p[i].x = c10::detail::round_to_nearest_even(v);
}

// Exact copy of one element's bits (a float or double move keeps NaN payloads on the targets built for).
SAMK_INLINE void copy_bits(float* dst, const float* src, int64_t i) { dst[i] = src[i]; }
SAMK_INLINE void copy_bits(double* dst, const double* src, int64_t i) { dst[i] = src[i]; }
template <typename T>
SAMK_INLINE void copy_bits(T* dst, const T* src, int64_t i) {
  dst[i].x = src[i].x;
}

// Calls f(T{}) with T the C++ type of the storage dtype.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kDouble:
      f(double{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "sam_kernels: unsupported dtype ", dtype);
  }
}

// One unit of parallel work: one chunk of one tensor.
struct WorkItem {
  int64_t tensor;
  int64_t begin, end;  // element range within the tensor
};

// NOTE (chunking): the work list is every chunk of every non-empty tensor, in tensor order, so item
// positions (and the norm's partials, one per item) do not depend on the thread count.
std::vector<WorkItem> work_items(at::TensorList tensors, int64_t* total_elements = nullptr) {
  std::vector<WorkItem> items;
  int64_t total = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const int64_t numel = tensors[k].numel();
    total += numel;
    for (int64_t begin = 0; begin < numel; begin += kChunkSize) {
      items.push_back(WorkItem{static_cast<int64_t>(k), begin, std::min(numel, begin + kChunkSize)});
    }
  }
  if (total_elements != nullptr) *total_elements = total;
  return items;
}

// Below this many elements a call runs on the calling thread (waking the pool costs more than the work).
constexpr int64_t kSerialElements = 1 << 15;

template <typename F>
void parallel_items(const std::vector<WorkItem>& items, int64_t total_elements, F&& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t grain = total_elements < kSerialElements ? n : 1;
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) f(j, items[j]);
  });
}

// Calls f(std::true_type{}) or f(std::false_type{}).
// NOTE (vectorization): every per-call switch of a loop (momentum, Nesterov, first step, weight decay,
// ...) becomes a template argument this way, so each loop the compiler sees is branch-free and
// vectorizes; with runtime flags it keeps the branches and runs scalar.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Raw copy of elements [begin, end) of tensor `src` into `dst` (bit for bit).
void copy_range(const at::Tensor& dst, const at::Tensor& src, int64_t begin, int64_t end) {
  if (dst.data_ptr() == src.data_ptr()) return;  // a parameter that is its own backup: nothing to copy
  const int64_t size = dst.element_size();
  std::memcpy(static_cast<char*>(dst.data_ptr()) + begin * size,
              static_cast<const char*>(src.data_ptr()) + begin * size, (end - begin) * size);
}

template <typename T>
T* data(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// ------------------------------------------------------------------------------------------ grad norm

constexpr int kLanes = 16;          // independent fp32 accumulators (one vector register's worth)
constexpr int64_t kSumBlock = 1024; // elements summed into the lanes before they are folded

// Sum over [begin, end) of norm_term^2: lanes accumulate blocks of kSumBlock elements, each block is
// folded by a fixed pairwise tree and added to the range's total in order. NOTE (determinism): the order
// of every addition depends only on the element range, never on threads or addresses (nor on the dtype:
// see NOTE (fp64 norm) in elementwise.h, a float64 element is converted to float before anything else).
template <typename T, bool ADAPTIVE>
SAMK_CPU_LOOP float sumsq_blocks(const T* __restrict grad, const T* __restrict weight, int64_t begin,
                                 int64_t end, float eta) {
  float total = 0.0f;
  for (int64_t block = begin; block < end; block += kSumBlock) {
    const int64_t block_end = std::min(end, block + kSumBlock);
    float acc[kLanes] = {};
    int64_t i = block;
    for (; i + kLanes <= block_end; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const float t = norm_term<ADAPTIVE>(static_cast<float>(load(grad, i + j)),
                                            ADAPTIVE ? static_cast<float>(load(weight, i + j)) : 0.0f, eta);
        acc[j] += t * t;
      }
    }
    for (int j = 0; i < block_end; ++i, ++j) {
      const float t = norm_term<ADAPTIVE>(static_cast<float>(load(grad, i)),
                                          ADAPTIVE ? static_cast<float>(load(weight, i)) : 0.0f, eta);
      acc[j] += t * t;
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
    }
    total += acc[0];
  }
  return total;
}

constexpr int kStreams = 4;  // parts of a range read side by side (see NOTE (memory streams))

// sumsq_blocks over [begin, end), read as kStreams equal parts (whole blocks each) side by side, the rest
// by sumsq_blocks; the parts' totals are added pairwise, then the rest's. NOTE (memory streams): one core
// reading one sequential stream is held back by how many cache misses it keeps in flight, so a norm read
// as one stream ran at about 40% of the bandwidth a fused SGD step reaches; four streams keep more in
// flight. The order stays a function of the range alone (NOTE (determinism) above).
template <typename T, bool ADAPTIVE>
SAMK_CPU_LOOP float sumsq_range(const T* __restrict grad, const T* __restrict weight, int64_t begin,
                                int64_t end, float eta) {
  const int64_t part = (end - begin) / kStreams / kSumBlock * kSumBlock;
  float totals[kStreams] = {};
  for (int64_t offset = 0; offset < part; offset += kSumBlock) {
    float acc[kStreams][kLanes] = {};
    for (int64_t i = 0; i < kSumBlock; i += kLanes) {
      for (int s = 0; s < kStreams; ++s) {
        const int64_t at = begin + s * part + offset + i;
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const float t = norm_term<ADAPTIVE>(static_cast<float>(load(grad, at + j)),
                                              ADAPTIVE ? static_cast<float>(load(weight, at + j)) : 0.0f, eta);
          acc[s][j] += t * t;
        }
      }
    }
    for (int s = 0; s < kStreams; ++s) {
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) acc[s][j] += acc[s][j + width];
      }
      totals[s] += acc[s][0];
    }
  }
  static_assert(kStreams == 4, "the pairwise sum below");
  const float streams = (totals[0] + totals[1]) + (totals[2] + totals[3]);
  return streams + sumsq_blocks<T, ADAPTIVE>(grad, weight, begin + kStreams * part, end, eta);
}

std::tuple<at::Tensor, at::Tensor> grad_norm_cpu(at::TensorList grads, at::TensorList weights,
                                                 double adaptive_eta) {
  const at::Device device = device_of(grads);
  check_grad_norm_args(grads, weights);
  const bool adaptive = !weights.empty();
  int64_t total_elements = 0;
  const auto items = work_items(grads, &total_elements);
  std::vector<float> partials(items.size());
  const float eta = static_cast<float>(adaptive_eta);
  parallel_items(items, total_elements, [&](int64_t j, const WorkItem& item) {
    const at::Tensor& g = grads[item.tensor];
    dispatch_dtype(g.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      partials[j] = adaptive ? sumsq_range<T, true>(data<T>(g), data<T>(weights[item.tensor]), item.begin,
                                                    item.end, eta)
                             : sumsq_range<T, false>(data<T>(g), nullptr, item.begin, item.end, eta);
    });
  });
  // NOTE: the second stage sums the per-chunk partials in chunk order on one thread: deterministic.
  float sum = 0.0f;
  for (const float p : partials) sum += p;
  const NormResult result = finish_norm(sum);
  at::Tensor norm = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  at::Tensor nonfinite = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  *data<float>(norm) = result.norm;
  *data<float>(nonfinite) = result.nonfinite;
  return {norm, nonfinite};
}

// ---------------------------------------------------------------------------------------------- perturb

// n elements from `param` (element `offset` of its tensor): out = the perturbed weights (out may be
// param), and with BACKUP backup = param (else the caller streams it: NOTE (streamed backup)).
template <typename T, bool ADAPTIVE, bool MASKED, bool BACKUP>
SAMK_CPU_LOOP void perturb_range(T* out, T* __restrict backup, const T* param, const T* __restrict grad,
                                 int64_t n, int64_t offset, math_t<T> scale, math_t<T> eta,
                                 const MaskKey mask_key, uint32_t tensor_index) {
  using C = math_t<T>;
  // NOTE: local copies of every loop invariant: the compiler cannot prove that the element stores leave a
  // referenced struct alone, and would reload it (and give up vectorizing) otherwise.
  const MaskKey key = mask_key;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (BACKUP) copy_bits(backup, param, i);
    // NOTE: the mask counter is the element's offset in the tensor's memory (NOTE (layout), checks.h).
    const bool keep = !MASKED || keep_element(key, static_cast<uint32_t>(offset + i), tensor_index);
    store(out, i, perturb_element<ADAPTIVE, C>(load(param, i), load(grad, i), scale, eta, keep, true));
  }
}

// NOTE (streamed backup): the backup is written once per step and read only at the restore, after the
// second forward and backward have gone through the whole model, so on a model larger than the caches
// each of its ordinary stores would first read the line into the cache only to evict it unread. Above
// kStreamedBytes per call the perturbation writes it with non-temporal stores that go to memory
// directly: block by block, the block's raw bytes are streamed from the weights to the backup (the
// weights' block then stays in L1 for the perturbation's loop), and an sfence ends each work item so the
// stores are visible before the op returns. The bytes are copied unchanged: the results are exactly
// those of the one-loop path, for every dtype. (Streaming the weights and the momentum of the fused
// descent too, through an L1 scratch, was slower here: those stores stay ordinary.)
constexpr int64_t kStreamedBytes = int64_t{16} << 20;
constexpr int64_t kStreamedBlockBytes = int64_t{8} << 10;

void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 16; bytes -= 16, d += 16, s += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::IntArrayRef tensor_indices, const at::Tensor& norm, const at::Tensor& step, double rho,
                 double eps, int64_t keep_threshold, double scale_factor, bool normalize, bool adaptive,
                 double adaptive_eta, int64_t seed_lo, int64_t seed_hi) {
  const at::Device device = device_of(params);
  check_perturb_args(params, grads, backups, tensor_indices, step, keep_threshold, scale_factor);
  if (params.empty()) return;
  const float norm_value = *data<float>(device_scalar("norm", norm, device));
  const uint64_t step_value = static_cast<uint64_t>(step.reshape({}).item<int64_t>());

  const PerturbConfigT<double> config = perturb_config(rho, eps, scale_factor, adaptive_eta, normalize);
  const float scale = perturb_scale(config_as<float>(config), norm_value);  // fp32 (NOTE (fp64 norm))
  const bool finite = is_finite(norm_value);
  const MaskKey key{static_cast<uint32_t>(seed_lo), static_cast<uint32_t>(seed_hi),
                    static_cast<uint32_t>(step_value), static_cast<uint32_t>(step_value >> 32),
                    static_cast<uint32_t>(keep_threshold)};
  const bool masked = key.threshold < kKeepAll;

  int64_t total_elements = 0;
  const auto items = work_items(params, &total_elements);
  const bool streamed = !params.empty() && total_elements * params[0].element_size() >= kStreamedBytes;
  parallel_items(items, total_elements, [&](int64_t, const WorkItem& item) {
    const int64_t k = item.tensor;
    if (!finite) {
      // A non-finite norm leaves the weights as they are; the backup is still written.
      copy_range(backups[k], params[k], item.begin, item.end);
      return;
    }
    const auto index = static_cast<uint32_t>(tensor_indices[k]);
    dispatch_dtype(params[k].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using C = math_t<T>;
      const C eta = config_as<C>(config).adaptive_eta;
      T* const param = data<T>(params[k]);
      T* const backup = data<T>(backups[k]);
      const T* const grad = data<T>(grads[k]);
      with_flag(adaptive, [&](auto adaptive_) {
        with_flag(masked, [&](auto masked_) {
          if (!streamed) {
            perturb_range<T, adaptive_, masked_, true>(param + item.begin, backup + item.begin,
                                                       param + item.begin, grad + item.begin,
                                                       item.end - item.begin, item.begin, C(scale), eta, key,
                                                       index);
            return;
          }
          const int64_t block = kStreamedBlockBytes / static_cast<int64_t>(sizeof(T));
          for (int64_t begin = item.begin; begin < item.end; begin += block) {
            const int64_t n = std::min(item.end - begin, block);
            stream_copy(backup + begin, param + begin, n * static_cast<int64_t>(sizeof(T)));
            perturb_range<T, adaptive_, masked_, false>(param + begin, nullptr, param + begin, grad + begin, n,
                                                        begin, C(scale), eta, key, index);
          }
          stream_fence();
        });
      });
    });
  });
}

// ------------------------------------------------------------------------------------------ Gaussian noise

template <typename T, bool PRECISION>
SAMK_CPU_LOOP void noise_range(T* __restrict param, T* __restrict backup, const T* __restrict scale,
                               int64_t begin, int64_t end, math_t<T> factor, const NoiseKey stream_key,
                               uint32_t tensor_index) {
  using C = math_t<T>;
  const NoiseKey key = stream_key;  // a local copy (see perturb_range)
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    copy_bits(backup, param, i);
    // NOTE: the noise counter is i, the element's offset in the tensor's memory, like the mask's.
    const float z = gaussian_element(key, static_cast<uint32_t>(i), tensor_index);
    store(param, i, noise_element<PRECISION, C>(load(param, i), load(scale, i), z, factor));
  }
}

void gaussian_noise_cpu(at::TensorList params, at::TensorList backups, at::TensorList scales,
                        at::IntArrayRef tensor_indices, const at::Tensor& step,
                        at::ArrayRef<double> config_values, int64_t seed_lo, int64_t seed_hi) {
  const NoiseConfigT<double> config = checked_noise_config(config_values);
  check_noise_args(params, backups, scales, tensor_indices, step);
  if (params.empty()) return;
  const uint64_t step_value = static_cast<uint64_t>(step.reshape({}).item<int64_t>());
  const NoiseKey key = noise_key(static_cast<uint32_t>(seed_lo), static_cast<uint32_t>(seed_hi), step_value);
  int64_t total_elements = 0;
  const auto items = work_items(params, &total_elements);
  parallel_items(items, total_elements, [&](int64_t, const WorkItem& item) {
    const int64_t k = item.tensor;
    const auto index = static_cast<uint32_t>(tensor_indices[k]);
    dispatch_dtype(params[k].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using C = math_t<T>;
      const C factor = config_as<C>(config).factor;
      with_flag(config.precision, [&](auto precision_) {
        noise_range<T, precision_>(data<T>(params[k]), data<T>(backups[k]), data<T>(scales[k]), item.begin,
                                   item.end, factor, key, index);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------- restore

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_restore_args(params, backups);
  int64_t total_elements = 0;
  const auto items = work_items(params, &total_elements);
  parallel_items(items, total_elements, [&](int64_t, const WorkItem& item) {
    copy_range(params[item.tensor], backups[item.tensor], item.begin, item.end);
  });
}

// ------------------------------------------------------------------------------------- restore + SGD

// n elements: param_out = the stepped weights from `backup`, buf_out = the new momentum from buf_in
// (outputs in place or into StreamedBlocks; param_out may be backup, buf_out buf_in).
template <typename T, bool HAS_MOMENTUM, bool FIRST_STEP, bool NESTEROV, bool WEIGHT_DECAY>
SAMK_CPU_LOOP void sgd_range(T* param_out, T* buf_out, const T* backup, const T* __restrict grad,
                             const T* buf_in, int64_t n, const SgdConfigT<math_t<T>>& config,
                             math_t<T> multiplier) {
  using C = math_t<T>;
  SgdConfigT<C> c = config;  // a local copy (see perturb_range) with the switches fixed at compile time
  c.has_momentum = HAS_MOMENTUM;
  c.nesterov = NESTEROV;
  c.maximize = false;  // folded into the multiplier by the caller
  if (!WEIGHT_DECAY) c.weight_decay = C(0);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    C w_new, buf_new;
    sgd_element<C>(c, load(backup, i), load(grad, i) * multiplier, HAS_MOMENTUM ? load(buf_in, i) : C(0),
                   FIRST_STEP, false, w_new, buf_new);
    if (HAS_MOMENTUM) store(buf_out, i, buf_new);
    store(param_out, i, w_new);
  }
}

void restore_sgd_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                          at::TensorList momentum_buffers, at::IntArrayRef first_step,
                          at::ArrayRef<double> config_values,
                          const std::optional<at::Tensor>& grad_multiplier,
                          const std::optional<at::Tensor>& found_inf) {
  const at::Device device = device_of(params);
  const SgdConfigT<double> config = checked_sgd_config(config_values);
  const bool has_momentum = config.has_momentum;
  check_sgd_args(params, backups, grads, momentum_buffers, first_step, has_momentum);
  const auto multiplier_t = optional_scalar("grad_multiplier", grad_multiplier, device);
  const auto found_inf_t = optional_scalar("found_inf", found_inf, device);
  const bool skip = found_inf_t ? *data<float>(*found_inf_t) != 0.0f : false;
  // NOTE: maximize folds into the multiplier: -(g * m) == g * (-m) exactly (rounding is sign-symmetric).
  // The fp32 multiplier converts to double exactly, so the float64 loops fold it the same way.
  const float sign = config.maximize ? -1.0f : 1.0f;
  const float multiplier = (multiplier_t ? *data<float>(*multiplier_t) : 1.0f) * sign;

  int64_t total_elements = 0;
  const auto items = work_items(params, &total_elements);
  parallel_items(items, total_elements, [&](int64_t, const WorkItem& item) {
    const int64_t k = item.tensor;
    if (skip) {
      // found_inf: restore the weights, leave the momentum buffers as they are.
      copy_range(params[k], backups[k], item.begin, item.end);
      return;
    }
    dispatch_dtype(params[k].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using C = math_t<T>;
      const SgdConfigT<C> c = config_as<C>(config);
      T* buf = has_momentum ? data<T>(momentum_buffers[k]) : nullptr;
      with_flag(has_momentum, [&](auto momentum_) {
        with_flag(has_momentum && first_step[k] != 0, [&](auto first_) {
          with_flag(has_momentum && config.nesterov, [&](auto nesterov_) {
            with_flag(c.weight_decay != C(0), [&](auto decay_) {
              T* const param = data<T>(params[k]) + item.begin;
              const T* const backup = data<T>(backups[k]) + item.begin;
              const T* const grad = data<T>(grads[k]) + item.begin;
              T* const buffer = momentum_ ? buf + item.begin : nullptr;
              sgd_range<T, momentum_, first_, nesterov_, decay_>(param, buffer, backup, grad, buffer,
                                                                 item.end - item.begin, c, C(multiplier));
            });
          });
        });
      });
    });
  });
}

// ------------------------------------------------------------------------------------ restore + Adam

template <typename T, bool AMSGRAD, bool DECOUPLED, bool WEIGHT_DECAY>
SAMK_CPU_LOOP void adam_range(T* param, const T* backup, const T* __restrict grad,
                              T* __restrict exp_avg, T* __restrict exp_avg_sq, T* __restrict max_exp_avg_sq,
                              int64_t begin, int64_t end, const AdamConfigT<math_t<T>>& config,
                              const AdamBiasT<math_t<T>>& tensor_bias, math_t<T> multiplier) {
  using C = math_t<T>;
  AdamConfigT<C> c = config;  // a local copy (see perturb_range) with the switches fixed at compile time
  c.amsgrad = AMSGRAD;
  c.decoupled = DECOUPLED;
  c.maximize = false;  // folded into the multiplier by the caller
  if (!WEIGHT_DECAY) c.weight_decay = C(0);
  const AdamBiasT<C> bias = tensor_bias;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    C w_out, m_out, v_out, v_max_out;
    adam_element<C>(c, bias, load(backup, i), load(grad, i) * multiplier, load(exp_avg, i),
                    load(exp_avg_sq, i), AMSGRAD ? load(max_exp_avg_sq, i) : C(0), false, w_out, m_out, v_out,
                    v_max_out);
    store(exp_avg, i, m_out);
    store(exp_avg_sq, i, v_out);
    if (AMSGRAD) store(max_exp_avg_sq, i, v_max_out);
    store(param, i, w_out);
  }
}

void restore_adam_step_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, at::TensorList steps,
                           at::ArrayRef<double> config_values,
                           const std::optional<at::Tensor>& grad_multiplier,
                           const std::optional<at::Tensor>& found_inf) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  const AdamConfigT<double> config = checked_adam_config(config_values);
  check_adam_args(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, config.amsgrad);
  // The step counters (float32, already advanced), read once; each work item computes its tensor's bias
  // terms in its math type (two pow calls per chunk).
  std::vector<float> step_values(n);
  for (size_t k = 0; k < n; ++k) step_values[k] = *data<float>(device_scalar("steps", steps[k], device));
  const auto multiplier_t = optional_scalar("grad_multiplier", grad_multiplier, device);
  const auto found_inf_t = optional_scalar("found_inf", found_inf, device);
  const bool skip = found_inf_t ? *data<float>(*found_inf_t) != 0.0f : false;
  // NOTE: maximize folds into the multiplier, as in restore_sgd_step_cpu.
  const float sign = config.maximize ? -1.0f : 1.0f;
  const float multiplier = (multiplier_t ? *data<float>(*multiplier_t) : 1.0f) * sign;

  int64_t total_elements = 0;
  const auto items = work_items(params, &total_elements);
  parallel_items(items, total_elements, [&](int64_t, const WorkItem& item) {
    const int64_t k = item.tensor;
    if (skip) {
      // found_inf: restore the weights, leave every state tensor as it is.
      copy_range(params[k], backups[k], item.begin, item.end);
      return;
    }
    dispatch_dtype(params[k].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using C = math_t<T>;
      const AdamConfigT<C> c = config_as<C>(config);
      const AdamBiasT<C> bias = adam_bias(c, step_values[k]);
      T* max_sq = config.amsgrad ? data<T>(max_exp_avg_sqs[k]) : nullptr;
      with_flag(config.amsgrad, [&](auto amsgrad_) {
        with_flag(config.decoupled && c.weight_decay != C(0), [&](auto decoupled_) {
          with_flag(c.weight_decay != C(0), [&](auto decay_) {
            adam_range<T, amsgrad_, decoupled_, decay_>(
                data<T>(params[k]), data<T>(backups[k]), data<T>(grads[k]), data<T>(exp_avgs[k]),
                data<T>(exp_avg_sqs[k]), max_sq, item.begin, item.end, c, bias, C(multiplier));
          });
        });
      });
    });
  });
}

// ----------------------------------------------------------------------------------------------- Philox

at::Tensor philox_cpu(const at::Tensor& counters, int64_t key0, int64_t key1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "counters: expected an int64 tensor of shape (N, 4)");
  const at::Tensor in = counters.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t* c = data<int64_t>(in);
  int64_t* o = data<int64_t>(out);
  const auto k0 = static_cast<uint32_t>(key0);
  const auto k1 = static_cast<uint32_t>(key1);
  for (int64_t i = 0; i < in.size(0); ++i) {
    const U32x4 r = philox4x32_10(
        U32x4{static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
              static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3])},
        k0, k1);
    o[4 * i] = r.x;
    o[4 * i + 1] = r.y;
    o[4 * i + 2] = r.z;
    o[4 * i + 3] = r.w;
  }
  return out;
}

}  // namespace
}  // namespace sam_kernels

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("grad_norm", &sam_kernels::grad_norm_cpu);
  m.impl("perturb_", &sam_kernels::perturb_cpu);
  m.impl("restore_", &sam_kernels::restore_cpu);
  m.impl("gaussian_noise_", &sam_kernels::gaussian_noise_cpu);
  m.impl("restore_sgd_step_", &sam_kernels::restore_sgd_step_cpu);
  m.impl("restore_adam_step_", &sam_kernels::restore_adam_step_cpu);
  m.impl("philox4x32_10", &sam_kernels::philox_cpu);
}
