// Operator schemas of the sam_kernels library and the Python module `sam_kernels._C` that loads them.
//
// The CPU implementations are registered in csrc/cpu/ops_cpu.cpp, the CUDA ones in csrc/cuda/ops_cuda.cpp;
// the fake (meta) implementations that torch.compile and torch.library.opcheck need live in Python, in
// sam_kernels/backends/native_backend.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "sam_kernels/elementwise.h"

#ifdef SAMK_WITH_CUDA
#include "cuda/launch.h"
#endif

// SAMK_BUILD_TOOL names the build system (setuptools or cmake); a bare token, stringified below, so no
// build tool has to quote a string through its command line.
#ifndef SAMK_BUILD_TOOL
#define SAMK_BUILD_TOOL unknown
#endif

TORCH_LIBRARY(sam_kernels, m) {
  m.set_python_module("sam_kernels.backends.native_backend");
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // NOTE (schemas): every list the op writes is declared mutable (`Tensor(x!)[]`) and nothing else is
  // written, which is what functionalization and opcheck's schema test rely on. Per-step scalars (norm,
  // RNG step, gradient multiplier, found_inf, Adam's step counters) are tensors, so no op reads them on
  // the host. An empty `weights` list means a plain (non-adaptive) norm; an empty `momentum_buffers` or
  // `max_exp_avg_sqs` list means no momentum or no AMSGrad. The 64-bit seed is passed as two 32-bit
  // words because schema ints are signed 64-bit. A fused step's options are one `float[] config`: the
  // values of its Python config, read by sgd_config and adam_config (elementwise.h).
  m.def("grad_norm(Tensor[] grads, Tensor[] weights, float adaptive_eta) -> (Tensor, Tensor)", tags);
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, int[] tensor_indices, "
      "Tensor norm, Tensor step, float rho, float eps, int keep_threshold, float scale_factor, "
      "bool normalize, bool adaptive, float adaptive_eta, int seed_lo, int seed_hi) -> ()",
      tags);
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()", tags);
  // backup = w, then w += sigma * z with z the noise contract's normal and sigma from `scales` (NoiseConfig).
  m.def(
      "gaussian_noise_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor[] scales, int[] tensor_indices, "
      "Tensor step, float[] config, int seed_lo, int seed_hi) -> ()",
      tags);
  m.def(
      "restore_sgd_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, int[] first_step, float[] config, Tensor? grad_multiplier, "
      "Tensor? found_inf) -> ()",
      tags);
  m.def(
      "restore_adam_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, float[] config, "
      "Tensor? grad_multiplier, Tensor? found_inf) -> ()",
      tags);
  // Philox4x32-10 on an int64 (N, 4) tensor of counter words (values in [0, 2**32)): the (N, 4) output
  // words. Exposes the kernels' own Philox code for known-answer and parity tests.
  m.def("philox4x32_10(Tensor counters, int key0, int key1) -> Tensor", tags);
}

namespace sam_kernels {
void bind_step_lists(pybind11::module_& module);  // csrc/step_lists.cpp
void bind_grad_marks(pybind11::module_& module);  // csrc/grad_marks.cpp
}  // namespace sam_kernels

namespace {

#define SAMK_STR2(x) #x
#define SAMK_STR(x) SAMK_STR2(x)

const char* compiler_name() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " SAMK_STR(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

// NOTE: importing sam_kernels._C runs the static registrations above (TORCH_LIBRARY and the
// TORCH_LIBRARY_IMPL blocks of the other files); the module itself carries the build facts and the step
// plans' StepLists and the closure convention's GradMarks.
PYBIND11_MODULE(_C, module) {
  module.doc() = "sam_kernels native kernels; the ops are torch.ops.sam_kernels.*";
#ifdef SAMK_WITH_CUDA
  module.attr("WITH_CUDA") = 1;
  module.attr("CUDA_ARCHS") = sam_kernels::cuda::compiled_arch_list();
  module.attr("CUDA_VERSION") = sam_kernels::cuda::compiled_cuda_version();
#else
  module.attr("WITH_CUDA") = 0;
  module.attr("CUDA_ARCHS") = "";
  module.attr("CUDA_VERSION") = "";
#endif
  module.attr("CHUNK_SIZE") = static_cast<int64_t>(sam_kernels::kChunkSize);
  module.attr("BUILD_TOOL") = SAMK_STR(SAMK_BUILD_TOOL);
  module.attr("CXX_COMPILER") = compiler_name();
  sam_kernels::bind_step_lists(module);
  sam_kernels::bind_grad_marks(module);
}
