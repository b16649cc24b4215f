// Argument checks shared by the CPU and CUDA implementations of the ops. The Python op layer
// (sam_kernels/ops.py) validates with friendlier messages first; these checks keep direct calls of
// torch.ops.sam_kernels.* memory safe.
//
// NOTE (aliasing): what these checks cannot see cheaply is overlap: the tensors of one call (each list, and
// a parameter and its companions) must not share memory, with one exception: in the restoring ops a
// backup may be its parameter itself (a parameter the ascent did not perturb; each element is then read
// and written by one thread, the read first, and those two operands are not __restrict__). The kernels
// take every other operand as __restrict__ (CUDA kernels and CPU loops), and two tensors that overlap
// would race across threads in any case; the op layer refuses overlapping parameters
// (sam_kernels/backends/common.py, first_overlap).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "sam_kernels/elementwise.h"
#include "sam_kernels/philox.h"

namespace sam_kernels {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// NOTE (layout): the kernels walk each tensor's memory as one flat array of numel() elements from
// data_ptr(), so any tensor that is non-overlapping and dense is accepted (contiguous, channels_last,
// channels_last_3d, any permutation of a contiguous tensor): its elements fill [data_ptr, data_ptr + numel)
// once each. An element's index (the chunk it falls in, the mask contract's element counter) is its offset
// in that memory, which for a contiguous tensor is the logical row-major index, as before. The companions of
// a tensor (gradient, backup, momentum buffer, Adam's state, the adaptive norm's weights) are paired with it
// by memory offset, so each must have exactly its strides and sizes; only the strides of dims of size 1 may
// differ, since they never move an element (torch itself leaves them unspecified). Two contiguous tensors
// pair up whatever their shapes when the element counts match (the rule before layouts were accepted).
inline bool same_memory_layout(const at::Tensor& t, const at::Tensor& like) {
  if (like.is_contiguous() && t.is_contiguous()) return true;
  if (t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

// Every tensor of `list` is a dense (non-overlapping and dense, see NOTE (layout)) float32/float64/
// float16/bfloat16 tensor on `device`, matching the element count, dtype and memory layout of the same
// position in `like` (named `like_name`, when given).
inline void check_list(const char* name, at::TensorList list, size_t expected, const at::Device& device,
                       at::TensorList like = {}, const char* like_name = "") {
  TORCH_CHECK(list.size() == expected, name, ": expected ", expected, " tensors, got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), name, "[", i, "]: undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, name, "[", i, "]: only dense tensors are supported");
    TORCH_CHECK(supported_dtype(t.scalar_type()), name, "[", i, "]: dtype ", t.scalar_type(),
                " is not supported (float32, float64, float16, bfloat16)");
    TORCH_CHECK(t.device() == device, name, "[", i, "]: on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_non_overlapping_and_dense(), name, "[", i, "]: must be non-overlapping and dense "
                "(contiguous, channels_last or another permutation of a contiguous tensor), got shape ",
                t.sizes(), " with strides ", t.strides(), "; pass a dense tensor (.contiguous() for a "
                "parameter, torch.empty_like(parameter) for its companions)");
    if (!like.empty()) {
      const at::Tensor& p = like[i];
      TORCH_CHECK(t.numel() == p.numel() && t.scalar_type() == p.scalar_type(), name, "[", i, "]: ",
                  t.numel(), " elements of ", t.scalar_type(), ", expected ", p.numel(), " of ",
                  p.scalar_type(), " like ", like_name, "[", i, "]");
      TORCH_CHECK(same_memory_layout(t, p), name, "[", i, "]: shape ", t.sizes(), " with strides ",
                  t.strides(), " does not have the memory layout of ", like_name, "[", i, "] (shape ",
                  p.sizes(), ", strides ", p.strides(), "); the kernels pair elements by their offset in "
                  "memory, so give it ", like_name, "[", i, "]'s layout: allocate it with torch.empty_like(",
                  like_name, "[", i, "]) (or zeros_like), or copy it into one");
    }
  }
}

// A one-element tensor on `device`, as float32 (converted on the device when needed, no host sync).
inline at::Tensor device_scalar(const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined() && t.numel() == 1, name, ": expected a one-element tensor");
  TORCH_CHECK(t.device() == device, name, ": on ", t.device(), ", expected ", device);
  return t.reshape({}).to(at::kFloat).contiguous();
}

inline std::optional<at::Tensor> optional_scalar(const char* name, const std::optional<at::Tensor>& t,
                                                 const at::Device& device) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return device_scalar(name, *t, device);
}

inline at::Device device_of(at::TensorList list) {
  return list.empty() ? at::Device(at::kCPU) : list[0].device();
}

// ------------------------------------------------------------------------------------------------
// The tensor-list checks of each op, shared by the CPU and CUDA implementations.

inline void check_grad_norm_args(at::TensorList grads, at::TensorList weights) {
  const at::Device device = device_of(grads);
  check_list("grads", grads, grads.size(), device);
  if (!weights.empty()) check_list("weights", weights, grads.size(), device, grads, "grads");
}

inline void check_perturb_args(at::TensorList params, at::TensorList grads, at::TensorList backups,
                               at::IntArrayRef tensor_indices, const at::Tensor& step,
                               int64_t keep_threshold, double scale_factor) {
  const at::Device device = device_of(params);
  check_list("params", params, params.size(), device);
  check_list("grads", grads, params.size(), device, params, "params");
  check_list("backups", backups, params.size(), device, params, "params");
  TORCH_CHECK(tensor_indices.size() == params.size(), "tensor_indices: expected ", params.size(),
              " entries, got ", tensor_indices.size());
  TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= kKeepAll, "keep_threshold: must be in [0, 2**24]");
  TORCH_CHECK(std::isfinite(scale_factor), "scale_factor: must be a finite number");
  if (params.empty()) return;
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong && step.device() == device,
              "step: expected a one-element int64 tensor on ", device);
}

inline void check_noise_args(at::TensorList params, at::TensorList backups, at::TensorList scales,
                             at::IntArrayRef tensor_indices, const at::Tensor& step) {
  const at::Device device = device_of(params);
  check_list("params", params, params.size(), device);
  check_list("backups", backups, params.size(), device, params, "params");
  check_list("scales", scales, params.size(), device, params, "params");
  TORCH_CHECK(tensor_indices.size() == params.size(), "tensor_indices: expected ", params.size(),
              " entries, got ", tensor_indices.size());
  if (params.empty()) return;
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong && step.device() == device,
              "step: expected a one-element int64 tensor on ", device);
}

inline void check_restore_args(at::TensorList params, at::TensorList backups) {
  const at::Device device = device_of(params);
  check_list("params", params, params.size(), device);
  check_list("backups", backups, params.size(), device, params, "params");
}

inline void check_sgd_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList momentum_buffers, at::IntArrayRef first_step, bool has_momentum) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  check_list("params", params, n, device);
  check_list("backups", backups, n, device, params, "params");
  check_list("grads", grads, n, device, params, "params");
  if (has_momentum) check_list("momentum_buffers", momentum_buffers, n, device, params, "params");
  TORCH_CHECK(first_step.size() == n, "first_step: expected ", n, " entries, got ", first_step.size());
}

inline void check_adam_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList steps, bool amsgrad) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  check_list("params", params, n, device);
  check_list("backups", backups, n, device, params, "params");
  check_list("grads", grads, n, device, params, "params");
  check_list("exp_avgs", exp_avgs, n, device, params, "params");
  check_list("exp_avg_sqs", exp_avg_sqs, n, device, params, "params");
  if (amsgrad) check_list("max_exp_avg_sqs", max_exp_avg_sqs, n, device, params, "params");
  TORCH_CHECK(steps.size() == n, "steps: expected ", n, " tensors, got ", steps.size());
  for (size_t k = 0; k < n; ++k) {
    TORCH_CHECK(steps[k].numel() == 1 && steps[k].scalar_type() == at::kFloat && steps[k].device() == device,
                "steps[", k, "]: expected a one-element float32 tensor on ", device);
  }
}

// A fused step's options as its schema takes them (`float[] config`: the values of its Python config),
// checked for their count and read by the struct's builder (elementwise.h).
inline SgdConfigT<double> checked_sgd_config(at::ArrayRef<double> values) {
  TORCH_CHECK(values.size() == kSgdConfigValues, "restore_sgd_step_: config: expected ", kSgdConfigValues,
              " values (SgdConfig.values()), got ", values.size());
  return sgd_config(values.data());
}

inline NoiseConfigT<double> checked_noise_config(at::ArrayRef<double> values) {
  TORCH_CHECK(values.size() == kNoiseConfigValues, "gaussian_noise_: config: expected ", kNoiseConfigValues,
              " values (NoiseConfig.values()), got ", values.size());
  return noise_config(values.data());
}

inline AdamConfigT<double> checked_adam_config(at::ArrayRef<double> values) {
  TORCH_CHECK(values.size() == kAdamConfigValues, "restore_adam_step_: config: expected ", kAdamConfigValues,
              " values (AdamConfig.values()), got ", values.size());
  return adam_config(values.data());
}

}  // namespace sam_kernels
