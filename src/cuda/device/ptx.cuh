// The memory operations the normal-mode protocol is built from, each with its PTX ordering spelled
// out. Scopes: `.sys` wherever the other side may be another GPU (flags and counters in NVLink-shared
// memory), `.gpu` for state only this device touches.
//
// Conventions used throughout src/cuda/kernels:
//   - data travels with weak 16-byte stores; a counter that publishes it is written by ONE thread
//     after a barrier over every thread that wrote the data, with release_fence_sys() followed by a
//     relaxed store (the PTX "release pattern": the fence is cumulative over what the barrier ordered);
//   - a reader loads the counter with an acquire, then a barrier/__syncwarp, then reads the data with
//     L1-bypassing loads (ld.global.cg): queue slots are rewritten every lap and L1 is not coherent.
#pragma once

#include <cstdint>

namespace epcomm::cuda::device {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_relaxed_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void release_fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Release pattern for one thread: everything this thread (and, through a preceding barrier, the
// threads it synchronised with) wrote is visible before `value`.
__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  release_fence_sys();
  store_relaxed_sys(address, value);
}

__device__ __forceinline__ int32_t load_volatile(const int32_t* address) {
  return *reinterpret_cast<const volatile int32_t*>(address);
}

// 16-byte loads. `nc`: read-only data of the call (inputs), through the non-coherent path without
// allocating in L1. `cg`: data another GPU wrote (queue slots), cached in L2 only.
__device__ __forceinline__ int4 load_nc_16(const void* address) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

__device__ __forceinline__ int4 load_cg_16(const void* address) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address)
               : "memory");
  return v;
}

__device__ __forceinline__ void store_16(void* address, const int4& v) { *static_cast<int4*>(address) = v; }

// Streaming store for outputs this kernel never reads back.
__device__ __forceinline__ void store_streaming_16(void* address, const int4& v) {
  asm volatile("st.global.cs.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Named barrier over `num_threads` threads (a multiple of 32) of the block; id 0 is __syncthreads.
__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

}  // namespace epcomm::cuda::device
