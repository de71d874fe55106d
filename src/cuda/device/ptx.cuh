// The memory operations the normal-mode protocol is built from, each with its PTX ordering spelled
// out. Scopes: `.sys` wherever the other side may be another GPU (flags and counters in NVLink-shared
// memory), `.gpu` for state only this device touches.
//
// Conventions used throughout src/cuda/kernels:
//   - data travels with bulk copies (below) and a few weak 16-byte / 4-byte stores; a counter that
//     publishes it is written by the thread that waited for the bulk copies to complete, after a warp
//     barrier over the threads that made the plain stores, with release_fence_sys() followed by a
//     relaxed store (the PTX "release pattern": the fence is cumulative over what the barrier ordered);
//   - a reader loads the counter with an acquire, then __syncwarp and fence.proxy.async.global, then
//     reads the data with bulk copies (never through L1, which is not coherent).
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
// allocating in L1. `cg`: data another GPU wrote, cached in L2 only.
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

// ---- Bulk copies (TMA) and the mbarriers that track them (sm_90) -------------------------------
//
// Facts from the PTX ISA these wrappers rely on (the protocol's use of them is argued in
// docs/CUDA_NORMAL_MODE.md, "Memory ordering"):
//   - cp.async.bulk runs in the async proxy. Generic-proxy writes to shared memory that a bulk
//     store will read need fence.proxy.async.shared::cta by the writing threads before the thread
//     that issues the copy synchronises with them.
//   - A bulk load completes on an mbarrier (complete-tx of its byte count). A thread that observes
//     the phase complete (try_wait, acquire at CTA scope) sees the bytes in shared memory.
//   - A bulk store belongs to the issuing thread's bulk async-group once committed.
//     wait_group.read N returns when all but the newest N groups finished READING shared memory
//     (the source may be overwritten); wait_group N (no .read) when they COMPLETED, their writes
//     made visible to the executing thread. Only after the latter may that thread publish them
//     (release at system scope, preceded by fence.proxy.async.global).
//   - An mbarrier phase: try_wait.parity(P) is true iff the phase with parity P completed, where P
//     must be the parity of the current or the immediately preceding phase. A waiter may therefore
//     never be more than one phase ahead: every stage's barrier is waited on by one fixed thread or
//     warp that handles every use of the stage in order (see kernels/pipeline.cuh).

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ uint64_t global_address(const void* pointer) {
  uint64_t address;
  asm("cvta.to.global.u64 %0, %1;" : "=l"(address) : "l"(pointer));
  return address;
}

__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(barrier)), "r"(arrivals) : "memory");
}

// Makes initialised mbarriers visible to the async proxy (the bulk copies that complete on them).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Arrive (release at CTA scope): the writes this thread made before are seen by whoever observes
// the phase complete.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(barrier)) : "memory");
}

// Arrive and announce `bytes` of bulk loads that will complete on this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
}

// Announce `bytes` of bulk loads without arriving (the arrival comes later, after other writes).
__device__ __forceinline__ void mbarrier_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(shared_address(barrier)),
               "r"(bytes)
               : "memory");
}

// Whether the phase of parity `parity` completed (may suspend the thread briefly; acquire at CTA scope).
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* barrier, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred complete;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
      "selp.u32 %0, 1, 0, complete;\n"
      "}\n"
      : "=r"(done)
      : "r"(shared_address(barrier)), "r"(parity)
      : "memory");
  return done != 0;
}

// Same without suspending: one look.
__device__ __forceinline__ bool mbarrier_test_wait(uint64_t* barrier, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred complete;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
      "selp.u32 %0, 1, 0, complete;\n"
      "}\n"
      : "=r"(done)
      : "r"(shared_address(barrier)), "r"(parity)
      : "memory");
  return done != 0;
}

// Global -> shared bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned) that
// completes on `barrier`.
__device__ __forceinline__ void bulk_load(void* shared_destination, const void* global_source, uint32_t bytes,
                                          uint64_t* barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_address(shared_destination)),
               "l"(global_address(global_source)), "r"(bytes), "r"(shared_address(barrier))
               : "memory");
}

// Shared -> global bulk copy (the destination may be a peer GPU's memory), in this thread's current
// bulk async-group.
__device__ __forceinline__ void bulk_store(void* global_destination, const void* shared_source, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global_address(global_destination)),
               "r"(shared_address(shared_source)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// All but the newest kPending bulk groups of this thread completed (writes visible to this thread).
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

// All but the newest kPending bulk groups of this thread finished reading their shared memory.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// Orders this thread's generic-proxy accesses to shared memory with later async-proxy ones.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Same for global memory (both directions).
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

}  // namespace epcomm::cuda::device
