// The memory operations every CUDA kernel of epcomm is built from (both modes), each with its PTX
// ordering spelled out, and the clock the bounded waits read. One naming scheme:
//   <load|store|add|fetch_add>_<order>_<scope>   for synchronising accesses (order: acquire, release,
//                                                 relaxed; scope: sys, gpu), fence_acq_rel_<scope>;
//   <load|store>_<cache path>_16                 for 16-byte data vectors (nc, cg; store_16 is weak).
// Scopes: `.sys` wherever the other side may be another GPU (flags and counters in NVLink-shared or
// NVSHMEM memory), `.gpu` for state only this device touches.
//
// Conventions (normal mode: normal/kernels/common.cuh; low latency: low_latency/kernels/common.cuh):
//   - data travels with weak 16-byte stores; a flag or counter that publishes it is written by ONE
//     thread after a barrier over every thread that wrote the data, with a release (fence then relaxed
//     store, or a release add): the release is cumulative over what the barrier ordered;
//   - a reader loads the flag with an acquire, then a barrier/__syncwarp, then reads the data with
//     L1-bypassing loads (ld.global.cg): the data was written by another GPU and L1 is not coherent.
#pragma once

#include <cstdint>

namespace epcomm::cuda::device {

// 16-byte vectors in flight per lane in a warp's row copy (both modes). A build option
// (EPCOMM_COPY_UNROLL, src/cuda/CMakeLists.txt) so that it can be measured.
#ifndef EPCOMM_COPY_UNROLL
#define EPCOMM_COPY_UNROLL 8
#endif
constexpr int kCopyUnroll = EPCOMM_COPY_UNROLL;

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// ---- synchronising accesses ---------------------------------------------------------------------

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* address) {
  uint32_t value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

// A value another block or the host may change while this kernel runs.
__device__ __forceinline__ int32_t load_relaxed_gpu(const int32_t* address) {
  int32_t value;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ int32_t load_volatile(const int32_t* address) {
  return *reinterpret_cast<const volatile int32_t*>(address);
}

__device__ __forceinline__ void store_relaxed_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void store_release_gpu(uint32_t* address, uint32_t value) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// Release pattern for one thread: everything this thread (and, through a preceding barrier, the
// threads it synchronised with) wrote is visible before `value`.
__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  fence_acq_rel_sys();
  store_relaxed_sys(address, value);
}

// Adds `value` to a flag that another GPU polls, releasing everything ordered before it.
__device__ __forceinline__ void add_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// Counter shared by the blocks of one kernel: returns the value before the add.
__device__ __forceinline__ uint32_t fetch_add_release_gpu(uint32_t* address, uint32_t value) {
  uint32_t old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(address), "r"(value) : "memory");
  return old;
}

// ---- 16-byte data vectors (int4 or uint4) --------------------------------------------------------

// `nc`: read-only data of the call (inputs), through the non-coherent path without allocating in L1.
template <class Vec = int4>
__device__ __forceinline__ Vec load_nc_16(const void* address) {
  Vec v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// `cg`: data another GPU wrote (queue slots, receive slots), cached in L2 only. Ordered after the
// acquire that made it visible (the asm clobbers memory; the acquire is asm volatile too).
template <class Vec = int4>
__device__ __forceinline__ Vec load_cg_16(const void* address) {
  Vec v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address)
               : "memory");
  return v;
}

// Weak store (default cache policy): outputs and normal-mode queue slots.
__device__ __forceinline__ void store_16(void* address, const int4& v) { *static_cast<int4*>(address) = v; }

// Store cached in L2 only (st.global.cg): low-latency payloads to a peer or into the outputs.
__device__ __forceinline__ void store_cg_16(void* address, const uint4& v) { __stcg(static_cast<uint4*>(address), v); }

// Named barrier over `num_threads` threads (a multiple of 32) of the block; id 0 is __syncthreads.
__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

}  // namespace epcomm::cuda::device
