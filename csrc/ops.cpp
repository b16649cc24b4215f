// Operator schemas of the sam_kernels library and the Python module `sam_kernels._C` that loads them.
//
// The CPU implementations are registered in csrc/cpu/ops_cpu.cpp, the CUDA ones in csrc/cuda/ops_cuda.cpp;
// the fake (meta) implementations that torch.compile and torch.library.opcheck need live in Python, in
// sam_kernels/backends/native_backend.py.
#include <Python.h>

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

namespace {

#define SAMK_STR2(x) #x
#define SAMK_STR(x) SAMK_STR2(x)

int add_build_info(PyObject* module) {
#ifdef SAMK_WITH_CUDA
  const long with_cuda = 1;
  const std::string archs = sam_kernels::cuda::compiled_arch_list();
  const std::string cuda_version = sam_kernels::cuda::compiled_cuda_version();
#else
  const long with_cuda = 0;
  const std::string archs;
  const std::string cuda_version;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) return -1;
  const long chunk_size = static_cast<long>(sam_kernels::kChunkSize);
  if (PyModule_AddIntConstant(module, "CHUNK_SIZE", chunk_size) < 0) return -1;
  if (PyModule_AddStringConstant(module, "CUDA_ARCHS", archs.c_str()) < 0) return -1;
  if (PyModule_AddStringConstant(module, "CUDA_VERSION", cuda_version.c_str()) < 0) return -1;
  if (PyModule_AddStringConstant(module, "BUILD_TOOL", SAMK_STR(SAMK_BUILD_TOOL)) < 0) return -1;
#if defined(__clang__)
  const char* compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  const char* compiler = "gcc " __VERSION__;
#elif defined(_MSC_VER)
  const char* compiler = "msvc " SAMK_STR(_MSC_VER);
#else
  const char* compiler = "unknown";
#endif
  if (PyModule_AddStringConstant(module, "CXX_COMPILER", compiler) < 0) return -1;
  return 0;
}

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "sam_kernels native kernels; the ops are torch.ops.sam_kernels.*", -1,
                          nullptr};

}  // namespace

// NOTE: importing sam_kernels._C runs the static registrations above (TORCH_LIBRARY and the
// TORCH_LIBRARY_IMPL blocks of the other files); the module itself only carries the build facts.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (add_build_info(module) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
