// Argument checks shared by the CPU and CUDA implementations of the ops. The Python op layer
// (sam_kernels/ops.py) validates with friendlier messages first; these checks keep direct calls of
// torch.ops.sam_kernels.* memory safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

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

}  // namespace sam_kernels
