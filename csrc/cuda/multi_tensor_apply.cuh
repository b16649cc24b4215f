// The multi-tensor-apply harness: one kernel launch covers many tensors, one thread block per
// (tensor, chunk) pair, found through a metadata table passed by value as the kernel's parameter.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/launch.h"
#include "sam_kernels/elementwise.h"

namespace sam_kernels {
namespace cuda {

constexpr int kThreads = 512;  // threads per block

// NOTE (vector width): per iteration every thread moves kVectorBytes of each operand, one 128-bit access
// (LDG.E.128 / STG.E.128 in SASS), that is kIlp<T> = 16 / sizeof(T) consecutive elements of storage type T:
// 8 for float16 and bfloat16, 4 for float32, 2 for float64. No kernel mixes storage types: every tensor
// operand of a launch has the dtype of its group's parameters (csrc/checks.h requires each companion to
// have its parameter's dtype), so each kernel takes its ILP from that one type. The float32 values a kernel
// also reads (the norm, the gradient multiplier, Adam's step counters) are per-block scalars, not streams,
// and the norm's partials are one store per block. (Were a kernel to stream two storage types, its ILP
// would come from the narrower one, so that the wider operand's group is two whole vectors.)
constexpr int kVectorBytes = 16;
template <typename T>
constexpr int kIlp = kVectorBytes / static_cast<int>(sizeof(T));

// NOTE (metadata table size): the table travels as the kernel parameter, so the launch needs no device
// allocation, no host-to-device copy and no host synchronization, and it is safe to capture in a CUDA
// graph (the parameter is copied into the graph node). CUDA 12.1+ allows 32764 bytes of parameters on
// Volta and newer, enough for a whole ResNet-50 (161 tensors, ~540 chunks) in one launch per op; older
// toolkits get the classic 4 KB budget and more launches. Kernels take the table as a
// `const __grid_constant__` parameter, so indexing it never copies it to local memory.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxTensors = 192;
constexpr int kMaxChunks = 2048;
constexpr size_t kMaxParamBytes = 32764;
#else
constexpr int kMaxTensors = 24;
constexpr int kMaxChunks = 160;
constexpr size_t kMaxParamBytes = 4096;
#endif

// NOTE (metadata table layout): block b of a launch works on chunk chunk_index[b] (elements
// [chunk_index * kChunkSize, min(numel, (chunk_index + 1) * kChunkSize))) of the tensor in row
// chunk_row[b]; row r's operand l lives at ptr[l][r]. Rows are filled in the order of the tensor list, so
// block b's position in the whole op (partial_offset + b) is the chunk's position in tensor-then-chunk
// order, the order in which the norm's partials are summed. A tensor whose chunks straddle two launches
// occupies row 0 of the second table as well.
template <int N>
struct ChunkTable {
  void* ptr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  const void* scalar[kMaxTensors];
  uint32_t aux[kMaxTensors];
  uint16_t chunk_row[kMaxChunks];
  int32_t chunk_index[kMaxChunks];
  int64_t partial_offset;
};

static_assert(sizeof(ChunkTable<6>) + 128 <= kMaxParamBytes, "metadata table exceeds the parameter budget");
static_assert(kMaxTensors <= 65535, "chunk_row is 16 bits");
// A chunk is a whole number of block iterations for every storage type (16-, 32- and 64-bit), so every
// chunk but a tensor's last is covered by whole vector groups, and a chunk's first element is 16-byte
// aligned whenever its tensor's first element is (kChunkSize * sizeof(T) is a multiple of 16).
template <typename T>
constexpr bool chunk_is_whole_iterations() {
  return kIlp<T> * static_cast<int>(sizeof(T)) == kVectorBytes && kChunkSize % (kThreads * kIlp<T>) == 0 &&
         (kChunkSize * static_cast<int64_t>(sizeof(T))) % kVectorBytes == 0;
}
static_assert(chunk_is_whole_iterations<uint16_t>(), "16-bit types: a chunk is whole block iterations");
static_assert(chunk_is_whole_iterations<uint32_t>(), "32-bit types: a chunk is whole block iterations");
static_assert(chunk_is_whole_iterations<uint64_t>(), "64-bit types: a chunk is whole block iterations");

// Fills tables from `lists` and calls launch(table, n_blocks) whenever one is full and at the end.
template <int N, typename Launch>
cudaError_t for_each_table(const TensorLists& lists, Launch&& launch) {
  ChunkTable<N> table;
  int row = 0;
  int n_chunks = 0;
  int64_t offset = 0;
  auto set_row = [&](int r, int64_t k) {
    for (int l = 0; l < N; ++l) table.ptr[l][r] = lists.ptrs[l * lists.n_tensors + k];
    table.numel[r] = lists.numels[k];
    table.scalar[r] = lists.scalars != nullptr ? lists.scalars[k] : nullptr;
    table.aux[r] = lists.aux != nullptr ? lists.aux[k] : 0u;
  };
  for (int64_t k = 0; k < lists.n_tensors; ++k) {
    const int64_t chunks = chunks_of(lists.numels[k]);
    if (chunks == 0) continue;
    set_row(row, k);
    bool row_reset = false;
    for (int64_t c = 0; c < chunks; ++c) {
      table.chunk_row[n_chunks] = static_cast<uint16_t>(row);
      table.chunk_index[n_chunks] = static_cast<int32_t>(c);
      ++n_chunks;
      const bool last_chunk = c + 1 == chunks;
      if (n_chunks == kMaxChunks || (last_chunk && row + 1 == kMaxTensors)) {
        table.partial_offset = offset;
        launch(table, n_chunks);
        const cudaError_t error = cudaGetLastError();
        if (error != cudaSuccess) return error;
        offset += n_chunks;
        n_chunks = 0;
        if (last_chunk) {
          row_reset = true;  // the next tensor starts a fresh table at row 0
        } else {
          set_row(0, k);  // the rest of this tensor continues in row 0 of the next table
          row = 0;
        }
      }
    }
    row = row_reset ? 0 : row + 1;
  }
  if (n_chunks > 0) {
    table.partial_offset = offset;
    launch(table, n_chunks);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ device building blocks

// This block's chunk: its row in the table, its first element and its length.
struct Chunk {
  int row;
  int64_t start;
  int64_t length;
};

template <int N>
__device__ __forceinline__ Chunk this_chunk(const ChunkTable<N>& table) {
  const int row = table.chunk_row[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk_index[blockIdx.x]) * kChunkSize;
  const int64_t end = min(table.numel[row], start + kChunkSize);
  return Chunk{row, start, end - start};
}

template <typename T, int N>
__device__ __forceinline__ T* operand(const ChunkTable<N>& table, int list, const Chunk& chunk) {
  return static_cast<T*>(table.ptr[list][chunk.row]) + chunk.start;
}

// Whether an operand's address allows 16-byte vector accesses (a null operand, one a kernel variant does
// not use, counts as aligned).
__device__ __forceinline__ bool vector_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
}

template <typename T>
struct alignas(kVectorBytes) Pack {
  T v[kIlp<T>];
};

// NOTE (alignment): each operand picks the vector or the scalar path by itself, from its own address: an
// operand whose first element is 16-byte aligned gets one 128-bit access per whole group, a misaligned one
// (say a view into a flat buffer at an odd offset: DDP's gradient bucket views misalign every gradient after
// a tensor whose size is not a multiple of 4) goes element by element, while the tensor's other operands
// keep their vector accesses. (Chunk starts keep the base's alignment, see chunk_is_whole_iterations.)
// NOTE (element mapping): on both paths thread t of a block handles elements [i, i + kIlp) with
// i = kIlp * (t + kThreads * iteration), and only a tensor's last, partial group is bounds-checked
// (scalar path). Which operands are aligned therefore changes neither which thread sees an element nor in
// which order it combines them, so a reduction's order (the norm's bits) never depends on alignment.
template <int ILP, typename T>
__device__ __forceinline__ void load_raw(T (&r)[ILP], const T* __restrict__ p, int64_t i, int64_t n,
                                         bool vector) {
  static_assert(ILP == kIlp<T>, "one 16-byte vector per group");
  if (vector) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p + i);
#pragma unroll
    for (int j = 0; j < ILP; ++j) r[j] = pack.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < ILP; ++j) r[j] = i + j < n ? p[i + j] : T{};  // value-initialized: +0
  }
}

template <int ILP, typename T>
__device__ __forceinline__ void store_raw(T* __restrict__ p, const T (&r)[ILP], int64_t i, int64_t n,
                                          bool vector) {
  static_assert(ILP == kIlp<T>, "one 16-byte vector per group");
  if (vector) {
    Pack<T> pack;
#pragma unroll
    for (int j = 0; j < ILP; ++j) pack.v[j] = r[j];
    *reinterpret_cast<Pack<T>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      if (i + j < n) p[i + j] = r[j];
    }
  }
}

// Deterministic sum over the block: a fixed shuffle tree inside each warp, then over the warps' sums.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // valid in thread 0
}

}  // namespace cuda
}  // namespace sam_kernels
