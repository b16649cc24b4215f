// Portability macros of the per-element headers: the same source compiles for the host (g++, clang, MSVC)
// and for the device (nvcc), without ATen.
#pragma once

#if defined(__CUDACC__)
#define SAMK_HOST_DEVICE __host__ __device__
#define SAMK_INLINE __forceinline__
#else
#define SAMK_HOST_DEVICE
#if defined(_MSC_VER)
#define SAMK_INLINE __forceinline
#else
#define SAMK_INLINE inline __attribute__((always_inline))
#endif
#endif

#define SAMK_FUNC SAMK_HOST_DEVICE SAMK_INLINE
