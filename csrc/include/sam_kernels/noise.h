// The standard normal of the noise contract (sam_kernels/backends/common.py, NOTE (noise contract)): one
// Box-Muller draw from two Philox4x32-10 words of the noise stream, computed with integer operations, bit
// casts and correctly rounded float32 + - * / and sqrt only, in one fixed order, so that the CPU build, the
// CUDA kernels, the Triton kernels and the pure-torch reference produce the same bits.
//
// NOTE (rounding): on the host the build compiles with -ffp-contract=off (no FMA contraction) and without
// -ffast-math, so each operator below rounds once; in device code nvcc would contract a multiply-add into an
// FMA, so every operation is an explicit round-to-nearest intrinsic (__fadd_rn, __fmul_rn, __fdiv_rn,
// __fsqrt_rn, and their double versions), which nvcc never contracts.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sam_kernels/macros.h"
#include "sam_kernels/philox.h"

namespace sam_kernels {

// Tag of the noise stream in Philox counter word 3 (the step's high word, below 2**31 for every mask step).
constexpr uint32_t kNoiseStreamTag = 0x80000000u;

// ------------------------------------------------------------------ correctly rounded, never contracted

SAMK_FUNC float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SAMK_FUNC float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SAMK_FUNC float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
SAMK_FUNC float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}
SAMK_FUNC double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
SAMK_FUNC double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
SAMK_FUNC double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
SAMK_FUNC double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return sqrt(a);
#endif
}

SAMK_FUNC uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}
SAMK_FUNC float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// The contract's float32 constants, by their bit patterns (NOISE_CONSTANT_BITS in common.py).
struct NoiseConstants {
  static constexpr uint32_t kSqrt2 = 0x3FB504F3u, kLn2 = 0x3F317218u, kAngleStep = 0x34C90FDBu;
  static constexpr uint32_t kLogC3 = 0x3EAAAAABu, kLogC5 = 0x3E4CCCCDu, kLogC7 = 0x3E124925u,
                            kLogC9 = 0x3DE38E39u;
  static constexpr uint32_t kCosC2 = 0xBF000000u, kCosC4 = 0x3D2AAAABu, kCosC6 = 0xBAB60B61u,
                            kCosC8 = 0x37D00D01u, kCosC10 = 0xB493F27Eu;
  static constexpr uint32_t kSinC3 = 0xBE2AAAABu, kSinC5 = 0x3C088889u, kSinC7 = 0xB9500D01u,
                            kSinC9 = 0x3638EF1Du;
};

// z = sqrt(-2 ln u1) cos(2 pi u2) from the words r0 (u1) and r1 (u2), in the contract's order.
SAMK_FUNC float box_muller(uint32_t r0, uint32_t r1) {
  using K = NoiseConstants;
  // ln u1 with u1 = n * 2**-24 in (0, 1]: float(n) is exact (n <= 2**24); its exponent and mantissa bits.
  const uint32_t n = (r0 >> 8) + 1u;
  const uint32_t bits = float_bits(static_cast<float>(n));
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const bool high = m > bits_float(K::kSqrt2);
  m = high ? mul_rn(m, 0.5f) : m;
  e = high ? e + 1 : e;
  const float s = div_rn(add_rn(m, -1.0f), add_rn(m, 1.0f));
  const float s2 = mul_rn(s, s);
  const float t = add_rn(s, s);
  float poly = add_rn(mul_rn(s2, bits_float(K::kLogC9)), bits_float(K::kLogC7));
  poly = add_rn(mul_rn(poly, s2), bits_float(K::kLogC5));
  poly = add_rn(mul_rn(poly, s2), bits_float(K::kLogC3));
  const float ln_m = add_rn(t, mul_rn(t, mul_rn(s2, poly)));
  const float ln_u = add_rn(mul_rn(static_cast<float>(e - 24), bits_float(K::kLn2)), ln_m);
  const float radius = sqrt_rn(mul_rn(ln_u, -2.0f));
  // cos(2 pi u2): quadrant from the top two of the 24 bits, the angle within it reduced to [0, pi/4].
  const uint32_t v = r1 >> 8;
  const uint32_t quadrant = v >> 22;
  const uint32_t w = v & 0x3FFFFFu;
  const bool upper = w >= (1u << 21);
  const uint32_t k = upper ? (1u << 22) - w : w;
  const float x = mul_rn(static_cast<float>(k), bits_float(K::kAngleStep));
  const float x2 = mul_rn(x, x);
  float c = add_rn(mul_rn(x2, bits_float(K::kCosC10)), bits_float(K::kCosC8));
  c = add_rn(mul_rn(c, x2), bits_float(K::kCosC6));
  c = add_rn(mul_rn(c, x2), bits_float(K::kCosC4));
  c = add_rn(mul_rn(c, x2), bits_float(K::kCosC2));
  c = add_rn(mul_rn(c, x2), 1.0f);
  float sn = add_rn(mul_rn(x2, bits_float(K::kSinC9)), bits_float(K::kSinC7));
  sn = add_rn(mul_rn(sn, x2), bits_float(K::kSinC5));
  sn = add_rn(mul_rn(sn, x2), bits_float(K::kSinC3));
  sn = add_rn(x, mul_rn(x, mul_rn(x2, sn)));
  float value = ((quadrant & 1u) != 0u) != upper ? sn : c;
  value = (((quadrant + 1u) >> 1) & 1u) != 0u ? -value : value;
  return mul_rn(radius, value);
}

// The noise stream's Philox key and the step half of its counter; constant over one noise call.
struct NoiseKey {
  uint32_t seed_lo, seed_hi;  // key = (seed & 0xffffffff, seed >> 32), the mask's key
  uint32_t step_lo, step_hi;  // counter words 2 and 3 = (step & 0xffffffff, (step >> 32) | kNoiseStreamTag)
};

SAMK_FUNC NoiseKey noise_key(uint32_t seed_lo, uint32_t seed_hi, uint64_t step) {
  return NoiseKey{seed_lo, seed_hi, static_cast<uint32_t>(step),
                  static_cast<uint32_t>(step >> 32) | kNoiseStreamTag};
}

// NOTE (noise contract): element `element` (its offset in the tensor's memory, truncated to 32 bits like the
// mask's) of the tensor at global position `tensor_index` draws the first two output words of
// Philox4x32-10(key = (seed_lo, seed_hi), counter = (element, tensor_index, step_lo, step_hi | tag)).
SAMK_FUNC float gaussian_element(const NoiseKey& key, uint32_t element, uint32_t tensor_index) {
  const U32x4 r = philox4x32_10(U32x4{element, tensor_index, key.step_lo, key.step_hi}, key.seed_lo,
                                key.seed_hi);
  return box_muller(r.x, r.y);
}

}  // namespace sam_kernels
