// Per-element math of every op, shared by the CPU loops (csrc/cpu) and the CUDA kernels (csrc/cuda). No
// ATen here: the loops load each element, convert it to the math type of its storage dtype (MathType below:
// double for float64, float for float32, float16 and bfloat16), call these functions and convert the
// results back to the storage dtype.
//
// NOTE (rounding): the scalar constants (lr, 1 - dampening, 1 - beta, 1 - lr * weight_decay, ...) are
// computed in double on the host and rounded to float once, and every expression keeps the operation order
// of the pure-torch reference (sam_kernels/backends/reference.py), so on the CPU (no FMA contraction) fp32
// results match the reference bit for bit wherever the reference itself computes in fp32. nvcc contracts
// multiply-adds into FMAs, so CUDA results may differ in the last bit. For float64 tensors the same
// constants stay doubles (config_as<double> below: nothing is rounded to float) and every function runs in
// double.
#pragma once

#include <math.h>
#include <stdint.h>

#include "sam_kernels/macros.h"
#include "sam_kernels/noise.h"
#include "sam_kernels/philox.h"

namespace sam_kernels {

// NOTE (chunking): the native CPU and CUDA kernels split each tensor into chunks of kChunkSize elements
// (the last one may be shorter; empty tensors own none; the Triton backend has its own, CHUNK in
// sam_kernels/backends/triton_backend.py). A chunk is the unit of parallel work and the unit of the norm's
// first reduction stage, so the norm's partials, and therefore its bits, do not depend on the thread count.
// Masks do not depend on chunking at all (they use the element index within the tensor).
constexpr int64_t kChunkSize = 65536;

SAMK_FUNC int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// The type the per-element math runs in for storage type T: double for double, float for everything else
// (float, and the 16-bit types, whose loads convert to float).
template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};
template <typename T>
using math_t = typename MathType<T>::type;

// The libm functions the math uses, overloaded on float and double (sqrtf and sqrt are different calls in
// device code and in C).
SAMK_FUNC float math_abs(float x) { return fabsf(x); }
SAMK_FUNC double math_abs(double x) { return fabs(x); }
SAMK_FUNC float math_sqrt(float x) { return sqrtf(x); }
SAMK_FUNC double math_sqrt(double x) { return sqrt(x); }
SAMK_FUNC float math_pow(float x, float y) { return powf(x, y); }
SAMK_FUNC double math_pow(double x, double y) { return pow(x, y); }

// NOTE: x - x is 0 for every finite x and NaN for +-inf and NaN; this works under -ffast-math too,
// unlike isfinite.
template <typename C>
SAMK_FUNC bool is_finite(C x) {
  return x - x == C(0);
}

// ------------------------------------------------------------------------------------------- grad norm

// The term whose square the norm sums: g, or (|w| + eta) * g for the adaptive (ASAM) norm.
// NOTE (fp64 norm): the norm is an fp32 scalar for every dtype. A float64 gradient (and weight) element is
// converted to float first (round to nearest), then squared and accumulated exactly like a float32 one:
// the norm only scales the perturbation, so fp32 is accurate enough, and a float64 parameter set gets the
// norm its float32 copy would get, from the same code (bit for bit on the CPU, where the summation order
// depends on the element range only). The perturbation scale derived from it stays fp32 too
// (perturb_scale); everything after that runs in double for float64 tensors.
template <bool ADAPTIVE>
SAMK_FUNC float norm_term(float g, float w, float eta) {
  return ADAPTIVE ? (fabsf(w) + eta) * g : g;
}

struct NormResult {
  float norm;
  float nonfinite;  // 1.0 when the sum of squares is not finite, else 0.0 (torch.amp's found_inf)
};

SAMK_FUNC NormResult finish_norm(float sum_of_squares) {
  return NormResult{sqrtf(sum_of_squares), is_finite(sum_of_squares) ? 0.0f : 1.0f};
}

// ---------------------------------------------------------------------------------------------- perturb

// C: the math type (float, or double for float64 tensors).
template <typename C>
struct PerturbConfigT {
  C rho, eps, scale_factor, adaptive_eta;  // scale_factor: apart from the mask (e.g. 1 / keep_prob)
  bool normalize;
};
using PerturbConfig = PerturbConfigT<float>;

// The options exactly as the host has them (doubles), before config_as rounds them to the math type.
inline PerturbConfigT<double> perturb_config(double rho, double eps, double scale_factor, double adaptive_eta,
                                             bool normalize) {
  return PerturbConfigT<double>{rho, eps, scale_factor, adaptive_eta, normalize};
}

template <typename To, typename From>
SAMK_FUNC PerturbConfigT<To> config_as(const PerturbConfigT<From>& c) {
  return PerturbConfigT<To>{static_cast<To>(c.rho), static_cast<To>(c.eps), static_cast<To>(c.scale_factor),
                            static_cast<To>(c.adaptive_eta), c.normalize};
}

// Scale of the perturbation from the device-resident fp32 norm: rho / (norm + eps) * scale_factor (rho *
// scale_factor without normalization). NOTE: the reference computes `rho / t` as `t.reciprocal() * rho`
// (torch's __rtruediv__), so this does too. Like the norm it derives from, the scale is fp32 for every dtype
// (the float config: rho, eps and scale_factor rounded to float once); float64 kernels widen it exactly.
SAMK_FUNC float perturb_scale(const PerturbConfig& c, float norm) {
  const float scale = c.normalize ? (1.0f / (norm + c.eps)) * c.rho : c.rho;
  return scale * c.scale_factor;
}

// w + scale * keep * (T_w^2 if ADAPTIVE) * g, or w itself when the norm is not finite.
template <bool ADAPTIVE, typename C>
SAMK_FUNC C perturb_element(C w, C g, C scale, C eta, bool keep, bool finite) {
  C e = scale * g;
  if (ADAPTIVE) {
    const C t = math_abs(w) + eta;
    e = e * t * t;
  }
  e = keep ? e : C(0);
  return finite ? w + e : w;
}

// ------------------------------------------------------------------------------------------------- SGD

template <typename C>
struct SgdConfigT {
  C lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, nesterov, maximize;
};
using SgdConfig = SgdConfigT<float>;

// The config as the ops take it: the fields of Python's SgdConfig (sam_kernels/backends/common.py), in its
// order, as doubles (SgdConfig.values()): lr, momentum, dampening, weight_decay, nesterov, maximize.
constexpr size_t kSgdConfigValues = 6;
inline SgdConfigT<double> sgd_config(const double* v) {
  return SgdConfigT<double>{v[0], v[1], 1.0 - v[2], v[3], v[1] != 0.0, v[4] != 0.0, v[5] != 0.0};
}

template <typename To, typename From>
SAMK_FUNC SgdConfigT<To> config_as(const SgdConfigT<From>& c) {
  return SgdConfigT<To>{static_cast<To>(c.lr), static_cast<To>(c.momentum),
                        static_cast<To>(c.one_minus_dampening), static_cast<To>(c.weight_decay),
                        c.has_momentum, c.nesterov, c.maximize};
}

// The second gradient as the base step sees it: multiplied (SSAM renormalization, AMP unscale), negated
// when maximizing.
template <typename C>
SAMK_FUNC C effective_grad(C g, C multiplier, bool maximize) {
  const C scaled = g * multiplier;
  return maximize ? -scaled : scaled;
}

// One torch.optim.SGD step from the restored weight w (the backup) and the effective gradient g.
// NOTE: weight decay acts on the restored weight. On skip (found_inf) the weight is the restored one and
// the momentum buffer keeps its old value.
template <typename C>
SAMK_FUNC void sgd_element(const SgdConfigT<C>& c, C w, C g, C buf, bool first_step, bool skip, C& w_out,
                           C& buf_out) {
  if (c.weight_decay != C(0)) {
    g = g + c.weight_decay * w;
  }
  buf_out = buf;
  if (c.has_momentum) {
    const C new_buf = first_step ? g : c.momentum * buf + c.one_minus_dampening * g;
    g = c.nesterov ? g + c.momentum * new_buf : new_buf;
    buf_out = skip ? buf : new_buf;
  }
  w_out = skip ? w : w - c.lr * g;
}

// ------------------------------------------------------------------------------------------------ Adam

template <typename C>
struct AdamConfigT {
  C lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  C decay_factor;  // 1 - lr * weight_decay (decoupled weight decay)
  bool decoupled, amsgrad, maximize;
};
using AdamConfig = AdamConfigT<float>;

// The config as the ops take it: the fields of Python's AdamConfig (sam_kernels/backends/common.py), in
// its order, as doubles (AdamConfig.values()): lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
// maximize.
constexpr size_t kAdamConfigValues = 8;
inline AdamConfigT<double> adam_config(const double* v) {
  const double lr = v[0], beta1 = v[1], beta2 = v[2], weight_decay = v[4];
  return AdamConfigT<double>{lr,           beta1,    beta2,   1.0 - beta1, 1.0 - beta2, v[3],
                             weight_decay, 1.0 - lr * weight_decay, v[5] != 0.0, v[6] != 0.0, v[7] != 0.0};
}

template <typename To, typename From>
SAMK_FUNC AdamConfigT<To> config_as(const AdamConfigT<From>& c) {
  return AdamConfigT<To>{static_cast<To>(c.lr),
                         static_cast<To>(c.beta1),
                         static_cast<To>(c.beta2),
                         static_cast<To>(c.one_minus_beta1),
                         static_cast<To>(c.one_minus_beta2),
                         static_cast<To>(c.eps),
                         static_cast<To>(c.weight_decay),
                         static_cast<To>(c.decay_factor),
                         c.decoupled,
                         c.amsgrad,
                         c.maximize};
}

// Per-tensor terms from the tensor's step counter (already advanced; a float32 tensor, whose integer
// values convert to double exactly): lr / (1 - beta1^step) and sqrt(1 - beta2^step), in the math type.
// NOTE: `lr / t` is `t.reciprocal() * lr` in the reference (torch's __rtruediv__).
template <typename C>
struct AdamBiasT {
  C step_size, bias_correction2_sqrt;
};
using AdamBias = AdamBiasT<float>;

template <typename C>
SAMK_FUNC AdamBiasT<C> adam_bias(const AdamConfigT<C>& c, float step) {
  const C bias_correction1 = C(1) - math_pow(c.beta1, C(step));
  return AdamBiasT<C>{(C(1) / bias_correction1) * c.lr, math_sqrt(C(1) - math_pow(c.beta2, C(step)))};
}

// torch.maximum: NaN if either operand is NaN.
template <typename C>
SAMK_FUNC C nan_max(C a, C b) {
  return (a != a || a > b) ? a : b;
}

// One torch.optim.Adam (AdamW when decoupled) step from the restored weight w. On skip every state value
// keeps its old value and the weight is the restored one.
template <typename C>
SAMK_FUNC void adam_element(const AdamConfigT<C>& c, const AdamBiasT<C>& bias, C w, C g, C m_old, C v_old,
                            C v_max_old, bool skip, C& w_out, C& m_out, C& v_out, C& v_max_out) {
  C w_decayed = w;
  if (c.weight_decay != C(0)) {
    if (c.decoupled) {
      w_decayed = w * c.decay_factor;
    } else {
      g = g + c.weight_decay * w;
    }
  }
  const C m = c.beta1 * m_old + c.one_minus_beta1 * g;
  const C v = c.beta2 * v_old + c.one_minus_beta2 * g * g;
  C second = v;
  v_max_out = v_max_old;
  if (c.amsgrad) {
    const C v_max = nan_max(v_max_old, v);
    v_max_out = skip ? v_max_old : v_max;
    second = v_max;
  }
  const C denom = math_sqrt(second) / bias.bias_correction2_sqrt + c.eps;
  const C updated = w_decayed - bias.step_size * m / denom;
  m_out = skip ? m_old : m;
  v_out = skip ? v_old : v;
  w_out = skip ? w : updated;
}

// ----------------------------------------------------------------------------------------- Gaussian noise

template <typename C>
struct NoiseConfigT {
  C factor;        // sigma = factor * scale, or 1 / sqrt(factor * scale) with `precision`
  bool precision;  // the companion tensor is a precision (bSAM's s, factor = N), not a standard deviation
};

// The config as the ops take it: the values of Python's NoiseConfig (sam_kernels/backends/common.py,
// NoiseConfig.values()): factor, precision. The seed travels apart (two 32-bit words, NoiseKey).
constexpr size_t kNoiseConfigValues = 2;
inline NoiseConfigT<double> noise_config(const double* v) { return NoiseConfigT<double>{v[0], v[1] != 0.0}; }

template <typename To, typename From>
SAMK_FUNC NoiseConfigT<To> config_as(const NoiseConfigT<From>& c) {
  return NoiseConfigT<To>{static_cast<To>(c.factor), c.precision};
}

// w + sigma * z for one element: w + z / sqrt(factor * scale) (PRECISION) or w + (factor * scale) * z. `z` is
// the contract's float32 normal (gaussian_element), widened exactly for double. NOTE: explicit
// round-to-nearest operations (noise.h), so nvcc contracts nothing here either and the noisy weight is the
// reference's bit for bit on every backend.
template <bool PRECISION, typename C>
SAMK_FUNC C noise_element(C w, C scale, float z, C factor) {
  const C spread = mul_rn(factor, scale);
  const C step = PRECISION ? div_rn(C(z), sqrt_rn(spread)) : mul_rn(spread, C(z));
  return add_rn(w, step);
}

}  // namespace sam_kernels
