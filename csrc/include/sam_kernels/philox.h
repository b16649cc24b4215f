// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// keep test of the perturbation mask. Host and device share this code, so the host build can be checked
// against the published known-answer vectors and against the pure-torch reference.
#pragma once

#include <stdint.h>

#include "sam_kernels/macros.h"

namespace sam_kernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

// Number of random bits the keep test compares; a threshold of 1 << kMaskBits keeps every element.
constexpr int kMaskBits = 24;
constexpr uint32_t kKeepAll = 1u << kMaskBits;

struct U32x4 {
  uint32_t x, y, z, w;
};

SAMK_FUNC void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

// Philox4x32 with 10 rounds; the key is bumped by the Weyl constants between rounds.
SAMK_FUNC U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.x, hi0, lo0);
    mulhilo32(kPhiloxM1, c.z, hi1, lo1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The mask's Philox key and the step half of its counter; constant over one perturb call.
struct MaskKey {
  uint32_t seed_lo, seed_hi;  // key = (seed & 0xffffffff, seed >> 32)
  uint32_t step_lo, step_hi;  // counter words 2 and 3 = (step & 0xffffffff, step >> 32)
  uint32_t threshold;         // keep iff (r >> 8) < threshold; threshold = round(keep_prob * 2**24)
};

// NOTE (mask contract, identical in every backend; see sam_kernels/backends/common.py): element `element`
// of the tensor at global position `tensor_index` (its position in the optimizer's parameter order, never
// its position in a dtype group or a chunk) is kept iff the first output word r of
//   Philox4x32-10(key = (seed_lo, seed_hi), counter = (element, tensor_index, step_lo, step_hi))
// satisfies (r >> 8) < threshold. The element index is truncated to 32 bits like the Triton kernels'
// `offs.to(tl.uint32)`. The test is an integer comparison, so no backend can round differently.
SAMK_FUNC bool keep_element(const MaskKey& key, uint32_t element, uint32_t tensor_index) {
  const U32x4 r = philox4x32_10(U32x4{element, tensor_index, key.step_lo, key.step_hi}, key.seed_lo,
                                key.seed_hi);
  return (r.x >> 8) < key.threshold;
}

}  // namespace sam_kernels
