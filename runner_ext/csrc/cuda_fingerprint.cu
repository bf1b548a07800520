// GPU-direct weight hand-off (server/weights_ipc.py): a device-to-device copy that also
// computes the copied bytes' fingerprint in the same pass, so the hand-off reads each byte
// once instead of once for the copy and once more for the fingerprint.
//
// The fingerprint of n bytes is three wrapping int64 sums: of the bytes' 32-bit words read
// as signed int32 at even word indices, at odd word indices, and of the n % 4 bytes after
// the last whole word read as uint8 (what `weights_ipc.fingerprint` computes with torch
// reductions; integer sums, so the order of the additions does not change them).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_fingerprint.h"

namespace aotiserve {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread per step

__device__ __forceinline__ long long warp_sum(long long v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums even and odd words over the block and adds them to sums[0], sums[1] (wrapping
// unsigned adds: two's-complement wrap, the same as torch's int64 sum).
__device__ void add_block(long long even, long long odd, unsigned long long* sums) {
  __shared__ long long part[2][kThreads / 32];
  even = warp_sum(even);
  odd = warp_sum(odd);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    part[0][warp] = even;
    part[1][warp] = odd;
  }
  __syncthreads();
  if (warp == 0) {
    even = lane < kThreads / 32 ? part[0][lane] : 0;
    odd = lane < kThreads / 32 ? part[1][lane] : 0;
    even = warp_sum(even);
    odd = warp_sum(odd);
    if (lane == 0) {
      atomicAdd(&sums[0], static_cast<unsigned long long>(even));
      atomicAdd(&sums[1], static_cast<unsigned long long>(odd));
    }
  }
}

// src and dst 16-byte aligned; n_vec 16-byte vectors (4 words each: x, z even; y, w odd).
__global__ void copy_vectors(const uint4* __restrict__ src, uint4* __restrict__ dst,
                             int64_t n_vec, unsigned long long* sums) {
  long long even = 0, odd = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n_vec; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = src[i + k * stride];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      dst[i + k * stride] = v[k];
      even += static_cast<long long>(static_cast<int32_t>(v[k].x)) + static_cast<int32_t>(v[k].z);
      odd += static_cast<long long>(static_cast<int32_t>(v[k].y)) + static_cast<int32_t>(v[k].w);
    }
  }
  for (; i < n_vec; i += stride) {
    const uint4 v = src[i];
    dst[i] = v;
    even += static_cast<long long>(static_cast<int32_t>(v.x)) + static_cast<int32_t>(v.z);
    odd += static_cast<long long>(static_cast<int32_t>(v.y)) + static_cast<int32_t>(v.w);
  }
  add_block(even, odd, sums);
}

// The bytes after the last whole vector (fewer than 16): copied and summed by one thread.
__global__ void copy_rest(const unsigned char* src, unsigned char* dst, int64_t from, int64_t n,
                          unsigned long long* sums) {
  long long even = 0, odd = 0, tail = 0;
  const int64_t words_end = n / 4 * 4;
  for (int64_t b = from; b < n; ++b) dst[b] = src[b];
  for (int64_t b = from; b < words_end; b += 4) {
    const uint32_t w = static_cast<uint32_t>(src[b]) | static_cast<uint32_t>(src[b + 1]) << 8 |
                       static_cast<uint32_t>(src[b + 2]) << 16 |
                       static_cast<uint32_t>(src[b + 3]) << 24;
    (b / 4 % 2 == 0 ? even : odd) += static_cast<int32_t>(w);
  }
  for (int64_t b = words_end; b < n; ++b) tail += src[b];
  atomicAdd(&sums[0], static_cast<unsigned long long>(even));
  atomicAdd(&sums[1], static_cast<unsigned long long>(odd));
  atomicAdd(&sums[2], static_cast<unsigned long long>(tail));
}

}  // namespace

const char* copy_fingerprint(const void* src, void* dst, int64_t nbytes, int64_t* sums,
                             int sm_count, cudaStream_t stream) {
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16 != 0) {
    return "source and destination must be 16-byte aligned";
  }
  auto* acc = reinterpret_cast<unsigned long long*>(sums);
  const int64_t n_vec = nbytes / 16;
  if (n_vec > 0) {
    const int64_t wanted = (n_vec + int64_t(kThreads) * kUnroll - 1) / (int64_t(kThreads) * kUnroll);
    const int blocks = static_cast<int>(wanted < int64_t(sm_count) * 8 ? wanted : int64_t(sm_count) * 8);
    copy_vectors<<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(src),
                                                  static_cast<uint4*>(dst), n_vec, acc);
  }
  if (n_vec * 16 < nbytes) {
    copy_rest<<<1, 1, 0, stream>>>(static_cast<const unsigned char*>(src),
                                   static_cast<unsigned char*>(dst), n_vec * 16, nbytes, acc);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace aotiserve
