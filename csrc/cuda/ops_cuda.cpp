// CUDA implementations of the sam_kernels ops: argument checks, grouping by dtype, device guard and current
// stream; the kernels themselves are in kernels.cu (reached through launch.h).
//
// NOTE (no host sync): nothing here reads device memory. Output scalars and the norm's partials are
// allocated with the caching allocator on the current stream; per-step scalars reach the kernels as device
// pointers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cuda/launch.h"

namespace sam_kernels {
namespace cuda {
namespace {

DType device_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "sam_kernels: unsupported dtype ", t);
  }
}

// Positions of `tensors` grouped by dtype, groups in order of first appearance, positions in list order.
std::vector<std::vector<size_t>> dtype_groups(at::TensorList tensors) {
  std::vector<at::ScalarType> seen;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto t = tensors[i].scalar_type();
    size_t g = 0;
    while (g < seen.size() && seen[g] != t) ++g;
    if (g == seen.size()) {
      seen.push_back(t);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

// Host-side storage behind a TensorLists view for the tensors at `positions` of each list.
struct HostLists {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<uint32_t> aux;
  std::vector<const void*> scalars;
  int n_lists = 0;

  HostLists(const std::vector<at::TensorList>& lists, const std::vector<size_t>& positions) {
    n_lists = static_cast<int>(lists.size());
    ptrs.reserve(lists.size() * positions.size());
    for (const at::TensorList& list : lists) {
      for (const size_t k : positions) ptrs.push_back(list[k].data_ptr());
    }
    for (const size_t k : positions) numels.push_back(lists[0][k].numel());
  }

  TensorLists view() const {
    return TensorLists{n_lists, static_cast<int64_t>(numels.size()), ptrs.data(), numels.data(),
                       aux.empty() ? nullptr : aux.data(), scalars.empty() ? nullptr : scalars.data()};
  }
};

int64_t total_chunks(at::TensorList tensors) {
  int64_t n = 0;
  for (const at::Tensor& t : tensors) n += chunks_of(t.numel());
  return n;
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// --------------------------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> grad_norm_cuda(at::TensorList grads, at::TensorList weights,
                                                  double adaptive_eta) {
  const at::Device device = device_of(grads);
  check_grad_norm_args(grads, weights);
  const bool adaptive = !weights.empty();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor norm = at::empty({}, options);
  at::Tensor nonfinite = at::empty({}, options);
  const int64_t n_partials = total_chunks(grads);
  at::Tensor partials = at::empty({std::max<int64_t>(n_partials, 1)}, options);
  // NOTE: the partials of all dtype groups share one buffer, group after group; its order is fixed by the
  // tensor list, so the norm is deterministic for a given list.
  int64_t offset = 0;
  for (const auto& group : dtype_groups(grads)) {
    std::vector<at::TensorList> lists = {grads};
    if (adaptive) lists.push_back(weights);
    const HostLists host(lists, group);
    C10_CUDA_CHECK(launch_sumsq_partials(device_dtype(grads[group[0]].scalar_type()), host.view(), adaptive,
                                         static_cast<float>(adaptive_eta),
                                         partials.data_ptr<float>() + offset, stream));
    for (const size_t k : group) offset += chunks_of(grads[k].numel());
  }
  C10_CUDA_CHECK(launch_finish_norm(partials.data_ptr<float>(), n_partials, norm.data_ptr<float>(),
                                    nonfinite.data_ptr<float>(), stream));
  return {norm, nonfinite};
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  at::IntArrayRef tensor_indices, const at::Tensor& norm, const at::Tensor& step, double rho,
                  double eps, int64_t keep_threshold, double scale_factor, bool normalize, bool adaptive,
                  double adaptive_eta, int64_t seed_lo, int64_t seed_hi) {
  const at::Device device = device_of(params);
  check_perturb_args(params, grads, backups, tensor_indices, step, keep_threshold, scale_factor);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const at::Tensor norm_f = device_scalar("norm", norm, device);
  const at::Tensor step_c = step.contiguous();
  const PerturbConfigT<double> config = perturb_config(rho, eps, scale_factor, adaptive_eta, normalize);
  for (const auto& group : dtype_groups(params)) {
    HostLists host({params, grads, backups}, group);
    for (const size_t k : group) host.aux.push_back(static_cast<uint32_t>(tensor_indices[k]));
    C10_CUDA_CHECK(launch_perturb(device_dtype(params[group[0]].scalar_type()), host.view(),
                                  norm_f.data_ptr<float>(), step_c.data_ptr<int64_t>(), config, adaptive,
                                  static_cast<uint32_t>(seed_lo), static_cast<uint32_t>(seed_hi),
                                  static_cast<uint32_t>(keep_threshold), stream));
  }
}

void gaussian_noise_cuda(at::TensorList params, at::TensorList backups, at::TensorList scales,
                         at::IntArrayRef tensor_indices, const at::Tensor& step,
                         at::ArrayRef<double> config_values, int64_t seed_lo, int64_t seed_hi) {
  const at::Device device = device_of(params);
  const NoiseConfigT<double> config = checked_noise_config(config_values);
  check_noise_args(params, backups, scales, tensor_indices, step);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const at::Tensor step_c = step.contiguous();
  for (const auto& group : dtype_groups(params)) {
    HostLists host({params, backups, scales}, group);
    for (const size_t k : group) host.aux.push_back(static_cast<uint32_t>(tensor_indices[k]));
    C10_CUDA_CHECK(launch_noise(device_dtype(params[group[0]].scalar_type()), host.view(),
                                step_c.data_ptr<int64_t>(), config, static_cast<uint32_t>(seed_lo),
                                static_cast<uint32_t>(seed_hi), stream));
  }
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  const at::Device device = device_of(params);
  check_restore_args(params, backups);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  for (const auto& group : dtype_groups(params)) {
    const HostLists host({params, backups}, group);
    C10_CUDA_CHECK(launch_restore(static_cast<int>(params[group[0]].element_size()), host.view(), stream));
  }
}

void restore_sgd_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList momentum_buffers, at::IntArrayRef first_step,
                          at::ArrayRef<double> config_values,
                           const std::optional<at::Tensor>& grad_multiplier,
                           const std::optional<at::Tensor>& found_inf) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  const SgdConfigT<double> config = checked_sgd_config(config_values);
  const bool has_momentum = config.has_momentum;
  check_sgd_args(params, backups, grads, momentum_buffers, first_step, has_momentum);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const auto multiplier = optional_scalar("grad_multiplier", grad_multiplier, device);
  const auto found = optional_scalar("found_inf", found_inf, device);
  for (const auto& group : dtype_groups(params)) {
    std::vector<at::TensorList> lists = {params, backups, grads};
    if (has_momentum) lists.push_back(momentum_buffers);
    HostLists host(lists, group);
    for (const size_t k : group) host.aux.push_back(first_step[k] != 0 ? 1u : 0u);
    C10_CUDA_CHECK(launch_sgd(device_dtype(params[group[0]].scalar_type()), host.view(), config,
                              optional_ptr(multiplier), optional_ptr(found), stream));
  }
}

void restore_adam_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList steps,
                           at::ArrayRef<double> config_values,
                            const std::optional<at::Tensor>& grad_multiplier,
                            const std::optional<at::Tensor>& found_inf) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  const AdamConfigT<double> config = checked_adam_config(config_values);
  check_adam_args(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, config.amsgrad);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const auto multiplier = optional_scalar("grad_multiplier", grad_multiplier, device);
  const auto found = optional_scalar("found_inf", found_inf, device);
  for (const auto& group : dtype_groups(params)) {
    std::vector<at::TensorList> lists = {params, backups, grads, exp_avgs, exp_avg_sqs};
    if (config.amsgrad) lists.push_back(max_exp_avg_sqs);
    HostLists host(lists, group);
    for (const size_t k : group) host.scalars.push_back(steps[k].data_ptr());
    C10_CUDA_CHECK(launch_adam(device_dtype(params[group[0]].scalar_type()), host.view(), config,
                               optional_ptr(multiplier), optional_ptr(found), stream));
  }
}

at::Tensor philox_cuda(const at::Tensor& counters, int64_t key0, int64_t key1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "counters: expected an int64 tensor of shape (N, 4)");
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor in = counters.contiguous();
  at::Tensor out = at::empty_like(in);
  C10_CUDA_CHECK(launch_philox(in.data_ptr<int64_t>(), out.data_ptr<int64_t>(), in.size(0),
                               static_cast<uint32_t>(key0), static_cast<uint32_t>(key1),
                               current_stream(counters.device())));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sam_kernels

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("grad_norm", &sam_kernels::cuda::grad_norm_cuda);
  m.impl("perturb_", &sam_kernels::cuda::perturb_cuda);
  m.impl("restore_", &sam_kernels::cuda::restore_cuda);
  m.impl("gaussian_noise_", &sam_kernels::cuda::gaussian_noise_cuda);
  m.impl("restore_sgd_step_", &sam_kernels::cuda::restore_sgd_step_cuda);
  m.impl("restore_adam_step_", &sam_kernels::cuda::restore_adam_step_cuda);
  m.impl("philox4x32_10", &sam_kernels::cuda::philox_cuda);
}
