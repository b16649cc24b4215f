// Interface between the ATen-facing CUDA glue (ops_cuda.cpp, compiled by the host compiler) and the kernels
// (kernels.cu, compiled by nvcc). It carries raw pointers only, so nvcc never parses the ATen headers: the
// .cu file compiles in seconds per architecture.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include <string>

#include "sam_kernels/elementwise.h"

namespace sam_kernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// The tensors of one launch group (one dtype): `n_lists` operand lists of `n_tensors` tensors each.
// NOTE (list layout): `ptrs` is list-major, ptrs[l * n_tensors + k] is operand l (param, grad, backup,
// ...) of tensor k, its data_ptr(); `numels[k]` is its element count; `aux[k]` an optional per-tensor
// integer (the global tensor index for perturb, the first-step flag for SGD); `scalars[k]` an optional
// per-tensor device scalar (Adam's float32 step counter).
struct TensorLists {
  int n_lists;
  int64_t n_tensors;
  void* const* ptrs;
  const int64_t* numels;
  const uint32_t* aux;        // may be null
  const void* const* scalars;  // may be null
};

// Stage 1 of the norm: partials[j] for every chunk j of the group, in tensor-then-chunk order. Lists: grads
// (and weights when `adaptive`).
cudaError_t launch_sumsq_partials(DType dtype, const TensorLists& lists, bool adaptive, float adaptive_eta,
                                  float* partials, cudaStream_t stream);
// Stage 2: norm = sqrt(sum of partials[0..n)) summed in a fixed order, nonfinite = 0/1.
cudaError_t launch_finish_norm(const float* partials, int64_t n, float* norm, float* nonfinite,
                               cudaStream_t stream);
// NOTE (configs): the op configs arrive as the host's doubles (perturb_config, sgd_config and adam_config in
// elementwise.h); each launch rounds them to its dtype's math type (config_as), to float exactly as the
// float kernels always had them, not at all for float64.
// Lists: params, grads, backups; aux: global tensor indices.
cudaError_t launch_perturb(DType dtype, const TensorLists& lists, const float* norm, const int64_t* step,
                           const PerturbConfigT<double>& config, bool adaptive, uint32_t seed_lo,
                           uint32_t seed_hi, uint32_t keep_threshold, cudaStream_t stream);
// Lists: params, backups, scales; aux: global tensor indices. backup = w, w += sigma * z (NoiseConfigT).
cudaError_t launch_noise(DType dtype, const TensorLists& lists, const int64_t* step,
                         const NoiseConfigT<double>& config, uint32_t seed_lo, uint32_t seed_hi,
                         cudaStream_t stream);
// Lists: params, backups (a raw copy of `element_size`-byte elements: 2, 4 or 8).
cudaError_t launch_restore(int element_size, const TensorLists& lists, cudaStream_t stream);
// Lists: params, backups, grads (, momentum buffers when config.has_momentum); aux: first-step flags.
cudaError_t launch_sgd(DType dtype, const TensorLists& lists, const SgdConfigT<double>& config,
                       const float* multiplier, const float* found_inf, cudaStream_t stream);
// Lists: params, backups, grads, exp_avgs, exp_avg_sqs (, max_exp_avg_sqs when config.amsgrad); scalars:
// the per-tensor float32 step counters.
cudaError_t launch_adam(DType dtype, const TensorLists& lists, const AdamConfigT<double>& config,
                        const float* multiplier, const float* found_inf, cudaStream_t stream);
// counters and out: n rows of 4 int64 words holding uint32 values.
cudaError_t launch_philox(const int64_t* counters, int64_t* out, int64_t n, uint32_t key0, uint32_t key1,
                          cudaStream_t stream);

// Architectures the device code was compiled for ("sm_80,sm_90") and the CUDA version ("13.0").
std::string compiled_arch_list();
std::string compiled_cuda_version();

}  // namespace cuda
}  // namespace sam_kernels
