// Argument checks shared by the CPU and CUDA implementations of the ops. The Python op layer
// (sam_kernels/ops.py) validates with friendlier messages first; these checks keep direct calls of
// torch.ops.sam_kernels.* memory safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "sam_kernels/philox.h"

namespace sam_kernels {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Every tensor of `list` is a dense contiguous float32/float16/bfloat16 tensor on `device`, matching the
// element count and dtype of the same position in `like` (when given).
inline void check_list(const char* name, at::TensorList list, size_t expected, const at::Device& device,
                       at::TensorList like = {}) {
  TORCH_CHECK(list.size() == expected, name, ": expected ", expected, " tensors, got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), name, "[", i, "]: undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, name, "[", i, "]: only dense tensors are supported");
    TORCH_CHECK(supported_dtype(t.scalar_type()), name, "[", i, "]: dtype ", t.scalar_type(),
                " is not supported (float32, float16, bfloat16)");
    TORCH_CHECK(t.device() == device, name, "[", i, "]: on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), name, "[", i, "]: must be contiguous");
    if (!like.empty()) {
      TORCH_CHECK(t.numel() == like[i].numel() && t.scalar_type() == like[i].scalar_type(), name, "[",
                  i, "]: ", t.numel(), " elements of ", t.scalar_type(), ", expected ", like[i].numel(),
                  " of ", like[i].scalar_type());
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
  if (!weights.empty()) check_list("weights", weights, grads.size(), device, grads);
}

inline void check_perturb_args(at::TensorList params, at::TensorList grads, at::TensorList backups,
                               at::IntArrayRef tensor_indices, const at::Tensor& step,
                               int64_t keep_threshold, double scale_factor) {
  const at::Device device = device_of(params);
  check_list("params", params, params.size(), device);
  check_list("grads", grads, params.size(), device, params);
  check_list("backups", backups, params.size(), device, params);
  TORCH_CHECK(tensor_indices.size() == params.size(), "tensor_indices: expected ", params.size(),
              " entries, got ", tensor_indices.size());
  TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= kKeepAll, "keep_threshold: must be in [0, 2**24]");
  TORCH_CHECK(std::isfinite(scale_factor), "scale_factor: must be a finite number");
  if (params.empty()) return;
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong && step.device() == device,
              "step: expected a one-element int64 tensor on ", device);
}

inline void check_restore_args(at::TensorList params, at::TensorList backups) {
  const at::Device device = device_of(params);
  check_list("params", params, params.size(), device);
  check_list("backups", backups, params.size(), device, params);
}

inline void check_sgd_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList momentum_buffers, at::IntArrayRef first_step, bool has_momentum) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  check_list("params", params, n, device);
  check_list("backups", backups, n, device, params);
  check_list("grads", grads, n, device, params);
  if (has_momentum) check_list("momentum_buffers", momentum_buffers, n, device, params);
  TORCH_CHECK(first_step.size() == n, "first_step: expected ", n, " entries, got ", first_step.size());
}

inline void check_adam_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList steps, bool amsgrad) {
  const at::Device device = device_of(params);
  const size_t n = params.size();
  check_list("params", params, n, device);
  check_list("backups", backups, n, device, params);
  check_list("grads", grads, n, device, params);
  check_list("exp_avgs", exp_avgs, n, device, params);
  check_list("exp_avg_sqs", exp_avg_sqs, n, device, params);
  if (amsgrad) check_list("max_exp_avg_sqs", max_exp_avg_sqs, n, device, params);
  TORCH_CHECK(steps.size() == n, "steps: expected ", n, " tensors, got ", steps.size());
  for (size_t k = 0; k < n; ++k) {
    TORCH_CHECK(steps[k].numel() == 1 && steps[k].scalar_type() == at::kFloat && steps[k].device() == device,
                "steps[", k, "]: expected a one-element float32 tensor on ", device);
  }
}

}  // namespace sam_kernels
