// Per-element math of every op, in fp32, shared by the CPU loops (csrc/cpu) and the CUDA kernels
// (csrc/cuda). No ATen here: the loops load each element, convert it to float, call these functions and
// convert the results back to the storage dtype.
//
// NOTE (rounding): the scalar constants (lr, 1 - dampening, 1 - beta, 1 - lr * weight_decay, ...) are
// computed in double on the host and rounded to float once, and every expression keeps the operation order
// of the pure-torch reference (sam_kernels/backends/reference.py), so on the CPU (no FMA contraction) fp32
// results match the reference bit for bit wherever the reference itself computes in fp32. nvcc contracts
// multiply-adds into FMAs, so CUDA results may differ in the last bit.
#pragma once

#include <math.h>
#include <stdint.h>

#include "sam_kernels/macros.h"
#include "sam_kernels/philox.h"

namespace sam_kernels {

// NOTE (chunking): the native CPU and CUDA kernels split each tensor into chunks of kChunkSize elements
// (the last one may be shorter; empty tensors own none; the Triton backend has its own, CHUNK in
// sam_kernels/backends/triton_backend.py). A chunk is the unit of parallel work and the unit of the norm's
// first reduction stage, so the norm's partials, and therefore its bits, do not depend on the thread count.
// Masks do not depend on chunking at all (they use the element index within the tensor).
constexpr int64_t kChunkSize = 65536;

SAMK_FUNC int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// NOTE: x - x is 0 for every finite x and NaN for +-inf and NaN; this works under -ffast-math too,
// unlike isfinite.
SAMK_FUNC bool is_finite(float x) { return x - x == 0.0f; }

// ------------------------------------------------------------------------------------------- grad norm

// The term whose square the norm sums: g, or (|w| + eta) * g for the adaptive (ASAM) norm.
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

struct PerturbConfig {
  float rho, eps, scale_factor, adaptive_eta;  // scale_factor: apart from the mask (e.g. 1 / keep_prob)
  bool normalize;
};

// Scale of the perturbation from the device-resident norm: rho / (norm + eps) * scale_factor (rho * scale_factor
// without normalization). NOTE: the reference computes `rho / t` as `t.reciprocal() * rho` (torch's
// __rtruediv__), so this does too.
SAMK_FUNC float perturb_scale(const PerturbConfig& c, float norm) {
  const float scale = c.normalize ? (1.0f / (norm + c.eps)) * c.rho : c.rho;
  return scale * c.scale_factor;
}

// w + scale * keep * (T_w^2 if ADAPTIVE) * g, or w itself when the norm is not finite.
template <bool ADAPTIVE>
SAMK_FUNC float perturb_element(float w, float g, float scale, float eta, bool keep, bool finite) {
  float e = scale * g;
  if (ADAPTIVE) {
    const float t = fabsf(w) + eta;
    e = e * t * t;
  }
  e = keep ? e : 0.0f;
  return finite ? w + e : w;
}

// ------------------------------------------------------------------------------------------------- SGD

struct SgdConfig {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, nesterov, maximize;
};

// The second gradient as the base step sees it: multiplied (SSAM renormalization, AMP unscale), negated
// when maximizing.
SAMK_FUNC float effective_grad(float g, float multiplier, bool maximize) {
  const float scaled = g * multiplier;
  return maximize ? -scaled : scaled;
}

// One torch.optim.SGD step from the restored weight w (the backup) and the effective gradient g.
// NOTE: weight decay acts on the restored weight. On skip (found_inf) the weight is the restored one and
// the momentum buffer keeps its old value.
SAMK_FUNC void sgd_element(const SgdConfig& c, float w, float g, float buf, bool first_step, bool skip,
                           float& w_out, float& buf_out) {
  if (c.weight_decay != 0.0f) {
    g = g + c.weight_decay * w;
  }
  buf_out = buf;
  if (c.has_momentum) {
    const float new_buf = first_step ? g : c.momentum * buf + c.one_minus_dampening * g;
    g = c.nesterov ? g + c.momentum * new_buf : new_buf;
    buf_out = skip ? buf : new_buf;
  }
  w_out = skip ? w : w - c.lr * g;
}

// ------------------------------------------------------------------------------------------------ Adam

struct AdamConfig {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  float decay_factor;  // 1 - lr * weight_decay (decoupled weight decay)
  bool decoupled, amsgrad, maximize;
};

// Per-tensor terms from the tensor's step counter (already advanced): lr / (1 - beta1^step) and
// sqrt(1 - beta2^step). NOTE: `lr / t` is `t.reciprocal() * lr` in the reference (torch's __rtruediv__).
struct AdamBias {
  float step_size, bias_correction2_sqrt;
};

SAMK_FUNC AdamBias adam_bias(const AdamConfig& c, float step) {
  const float bias_correction1 = 1.0f - powf(c.beta1, step);
  return AdamBias{(1.0f / bias_correction1) * c.lr, sqrtf(1.0f - powf(c.beta2, step))};
}

// torch.maximum: NaN if either operand is NaN.
SAMK_FUNC float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// One torch.optim.Adam (AdamW when decoupled) step from the restored weight w. On skip every state value
// keeps its old value and the weight is the restored one.
SAMK_FUNC void adam_element(const AdamConfig& c, const AdamBias& bias, float w, float g, float m_old,
                            float v_old, float v_max_old, bool skip, float& w_out, float& m_out,
                            float& v_out, float& v_max_out) {
  float w_decayed = w;
  if (c.weight_decay != 0.0f) {
    if (c.decoupled) {
      w_decayed = w * c.decay_factor;
    } else {
      g = g + c.weight_decay * w;
    }
  }
  const float m = c.beta1 * m_old + c.one_minus_beta1 * g;
  const float v = c.beta2 * v_old + c.one_minus_beta2 * g * g;
  float second = v;
  v_max_out = v_max_old;
  if (c.amsgrad) {
    const float v_max = nan_max(v_max_old, v);
    v_max_out = skip ? v_max_old : v_max;
    second = v_max;
  }
  const float denom = sqrtf(second) / bias.bias_correction2_sqrt + c.eps;
  const float updated = w_decayed - bias.step_size * m / denom;
  m_out = skip ? m_old : m;
  v_out = skip ? v_old : v;
  w_out = skip ? w : updated;
}

}  // namespace sam_kernels
