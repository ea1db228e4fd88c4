// 16-byte vector loads of fp32 / fp16 / bf16 arrays, widened to fp32, with a scalar fallback.
//
// A 16-byte load (LDG.E.128 in SASS) moves 4 fp32 or 8 fp16/bf16 elements per lane; it needs a
// 16-byte aligned address. load_chunk<T, true> is that load; load_chunk<T, false> reads the
// same chunk element by element, bounds-checked, for rows whose base, strides or length are
// not multiples of a chunk. for_each_widened() streams a contiguous range of any alignment
// through a thread block: scalar head up to the first 16-byte boundary, vectors, scalar tail;
// stage_widened() does the same into shared memory with 16-byte shared stores.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace kawhi {

constexpr int kVecBytes = 16;

// Elements of T in one 16-byte chunk.
template <typename T>
struct VecTraits {
  static constexpr int kElems = kVecBytes / static_cast<int>(sizeof(T));
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) == 0;
}

// The two 16-bit values of a 32-bit word, widened to fp32 (low half first).
__device__ __forceinline__ void widen_pair(uint32_t w, __half, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ void widen_pair(uint32_t w, __nv_bfloat16, float* out) {
  out[0] = __uint_as_float(w << 16);          // bf16 is the high half of an fp32
  out[1] = __uint_as_float(w & 0xffff0000u);
}

// One aligned 16-byte load through the read-only path, widened to fp32.
template <typename T>
__device__ __forceinline__ void load_vec16(const T* p, float (&out)[VecTraits<T>::kElems]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(words[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) widen_pair(words[i], T{}, out + 2 * i);
  }
}

// Elements [0, kElems) of the chunk at p, zero at and beyond `valid` (scalar path) or all of
// them (vector path: p must be 16-byte aligned and the chunk whole).
template <typename T, bool kVector>
__device__ __forceinline__ void load_chunk(const T* p, int valid,
                                           float (&out)[VecTraits<T>::kElems]) {
  if constexpr (kVector) {
    load_vec16(p, out);
  } else {
#pragma unroll
    for (int i = 0; i < VecTraits<T>::kElems; ++i) out[i] = i < valid ? to_float(p[i]) : 0.0f;
  }
}

// fp32 chunk of the same element count as T's (for fp32 workspaces read alongside T rows):
// 16-byte loads where kVector (address 16-byte aligned), else bounds-checked scalars.
template <int kElems, bool kVector>
__device__ __forceinline__ void load_float_chunk(const float* p, int valid, float (&out)[kElems]) {
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < kElems; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) out[i] = i < valid ? p[i] : 0.0f;
  }
}

// Calls f(i, value) once for every element i in [0, n) of p (any alignment of p beyond the
// element size), spread over `threads` threads: the elements before p's first 16-byte
// boundary and after its last whole chunk one at a time, the rest as 16-byte loads.
template <typename T, typename F>
__device__ __forceinline__ void for_each_widened(const T* p, int n, int tid, int threads, F&& f) {
  constexpr int V = VecTraits<T>::kElems;
  const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) /
                                          sizeof(T));
  const int head = min(n, misaligned ? V - misaligned : 0);
  for (int i = tid; i < head; i += threads) f(i, to_float(p[i]));
  const int vectors = (n - head) / V;
  const T* body = p + head;
  for (int v = tid; v < vectors; v += threads) {
    float x[V];
    load_vec16(body + v * V, x);
#pragma unroll
    for (int j = 0; j < V; ++j) f(head + v * V + j, x[j]);
  }
  for (int i = head + vectors * V + tid; i < n; i += threads) f(i, to_float(p[i]));
}

// Slots of slack stage_widened() needs in front of its shared-memory destination.
constexpr int kStageSlack = 4;

// Copies p[0, n) (any alignment) into shared memory as fp32 with 16-byte loads and 16-byte
// shared stores, spread over `threads` threads; returns where element 0 landed: `dst` (16-byte
// aligned, with kStageSlack slots of slack) shifted by 0-3 slots so that the elements read as
// vectors also start on a 16-byte boundary in shared memory. The caller synchronises.
template <typename T>
__device__ __forceinline__ float* stage_widened(const T* p, int n, float* dst, int tid,
                                                int threads) {
  constexpr int V = VecTraits<T>::kElems;
  const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) /
                                          sizeof(T));
  const int head = min(n, misaligned ? V - misaligned : 0);
  float* tile = dst + ((kStageSlack - head % kStageSlack) % kStageSlack);
  for (int i = tid; i < head; i += threads) tile[i] = to_float(p[i]);
  const int vectors = (n - head) / V;
  const T* body = p + head;
  float4* out = reinterpret_cast<float4*>(tile + head);
  for (int v = tid; v < vectors; v += threads) {
    float x[V];
    load_vec16(body + v * V, x);
#pragma unroll
    for (int j = 0; j < V; j += 4)
      out[v * (V / 4) + j / 4] = make_float4(x[j], x[j + 1], x[j + 2], x[j + 3]);
  }
  for (int i = head + vectors * V + tid; i < n; i += threads) tile[i] = to_float(p[i]);
  return tile;
}

}  // namespace kawhi
