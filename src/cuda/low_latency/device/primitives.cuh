// Device building blocks of the low-latency kernels: memory-ordered loads and stores, the bounded
// wait, block completion and error reporting.
//
// Memory ordering (PTX memory model):
//   - Data to a peer goes with plain (weak) stores. A block publishes its stores with
//     __syncthreads + fence.sc.sys (__threadfence_system) by one thread, then a relaxed atomic
//     on a local completion counter. The block that sees the counter complete does another
//     fence.sc.sys and sets each peer's flag with st.release.sys: by cumulativity every store
//     of every block is visible to a peer that reads the flag with ld.acquire.sys.
//   - A receiver polls its flag with ld.acquire.sys, then __syncthreads, then reads the data
//     with ld.global.cg (L2; the data was written by another GPU and is read once).
#pragma once

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "cuda/device/errors.cuh"
#include "cuda/low_latency/ll_params.hpp"

namespace epcomm::cuda::ll {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// A value another block or the host may change while this kernel runs.
__device__ __forceinline__ int32_t ld_relaxed(const int32_t* p) {
  int32_t v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// 16-byte moves. ld_input: read-only kernel input (non-coherent path, no L1 allocation).
__device__ __forceinline__ uint4 ld_input(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_shared_data(const void* p) { return __ldcg(static_cast<const uint4*>(p)); }
__device__ __forceinline__ void st_data(void* p, const uint4& v) { __stcg(static_cast<uint4*>(p), v); }

// A timeout anywhere in this Buffer (cuda/device/errors.cuh): every wait gives up at once.
__device__ __forceinline__ bool aborted(const Common& c) { return device::aborted(c.errors); }

// Records the first error of this Buffer in its host-visible word (cuda/device/errors.cuh); a
// timeout also raises the abort flag.
__device__ __forceinline__ void record_error(const Common& c, DeviceErrorKind kind, DevicePhase phase, int peer,
                                             int64_t value, int32_t detail = 0) {
  device::report_error(c.errors, kind, phase, peer, value, detail);
}

// Address of rank r's symmetric memory as seen from here, or null when r is reached with puts.
__device__ __forceinline__ uint8_t* peer_base(const Common& c, int r) {
  return reinterpret_cast<uint8_t*>(c.peer_bases[r]);
}

__device__ __forceinline__ bool is_masked(const Common& c, int r) { return ld_relaxed(c.mask + r) != 0; }

__device__ __forceinline__ uint64_t* local_flag(const Common& c, int set, int source) {
  return reinterpret_cast<uint64_t*>(c.local + ControlLayout::flag(set, source));
}

// Called by every thread of the block after its work. Returns true (in every thread) in the one
// block that finished last; that block also resets the counter for the next call.
__device__ __forceinline__ bool finish_block(uint32_t* counter) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // release this block's stores, peer stores included
    const uint32_t before = atomicAdd(counter, 1u);
    last = before == gridDim.x - 1;
    if (last) {
      atomicExch(counter, 0u);
      __threadfence_system();  // acquire: every block's stores precede what this block does next
    }
  }
  __syncthreads();
  return last != 0;
}

// Sets this rank's flag in `set` at every unmasked destination (called by the last block).
__device__ __forceinline__ void signal_destinations(const Common& c, int set) {
  for (int d = threadIdx.x; d < c.num_ranks; d += blockDim.x) {
    if (is_masked(c, d)) continue;
    uint8_t* base = peer_base(c, d);
    const int64_t offset = ControlLayout::flag(set, c.rank);
    if (base != nullptr) {
      st_release_sys(reinterpret_cast<uint64_t*>(base + offset), 1);
    } else {
      nvshmemx_signal_op(reinterpret_cast<uint64_t*>(c.local + offset), 1, NVSHMEM_SIGNAL_SET, d);
    }
  }
}

// Programmatic dependent launch (sm_90): a send kernel lets the receive kernel queued behind it
// start at once (the receive kernel synchronises through the flags, not through kernel order), and
// the receive kernel waits for the send kernel's completion only at its very end, so that work
// queued after the call still runs after both kernels.
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void wait_for_preceding_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

enum class WaitResult { kArrived, kTimedOut, kAborted };

// Polls `flag` (ld.acquire.sys) until it is non-zero, the deadline passes or the rank aborts.
__device__ __forceinline__ WaitResult wait_flag(const Common& c, const uint64_t* flag, uint64_t deadline) {
  uint32_t spins = 0;
  while (ld_acquire_sys(flag) == 0) {
    if ((++spins & 63u) == 0) {
      if (aborted(c)) return WaitResult::kAborted;
      if (global_timer_ns() > deadline) return WaitResult::kTimedOut;
    }
  }
  return WaitResult::kArrived;
}

// Waits until every unmasked source has set its flag in `set` (every thread of the block calls;
// returns false in every thread when the call must be abandoned). Without enable_shrink each
// block waits by itself; a timeout is an error naming the source. With enable_shrink block 0
// alone waits, masks the sources that time out and then opens `gate` for the other blocks, so
// that every block of the call agrees on who is masked.
__device__ __forceinline__ bool wait_for_sources(const Common& c, int set, DevicePhase phase, int64_t* wait_stats,
                                                 uint32_t* gate) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const uint64_t start = global_timer_ns();
  const uint64_t deadline = start + c.timeout_ns;
  const bool waits_itself = !c.shrink || blockIdx.x == 0;
  if (waits_itself) {
    for (int s = threadIdx.x; s < c.num_ranks; s += blockDim.x) {
      if (is_masked(c, s)) continue;
      const WaitResult result = wait_flag(c, local_flag(c, set, s), deadline);
      if (result == WaitResult::kTimedOut && c.shrink) {
        atomicExch(reinterpret_cast<uint32_t*>(c.mask + s), 1u);  // SPEC §6: skip the late rank from now on
      } else if (result == WaitResult::kTimedOut) {
        record_error(c, DeviceErrorKind::kTimeout, phase, s, static_cast<int64_t>(c.timeout_ns));
        failed = 1;
      } else if (result == WaitResult::kAborted) {
        failed = 1;
      }
      if (blockIdx.x == 0 && wait_stats != nullptr)
        atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + s),
                  static_cast<unsigned long long>(global_timer_ns() - start));
    }
  }
  __syncthreads();
  if (c.shrink) {
    if (blockIdx.x == 0) {
      if (threadIdx.x == 0) {
        __threadfence();
        st_release_gpu(gate, 1u);
      }
    } else if (threadIdx.x == 0) {
      // Block 0 settles within the timeout; allow it as long again before giving up.
      const uint64_t gate_deadline = deadline + c.timeout_ns;
      uint32_t spins = 0;
      while (ld_acquire_gpu(gate) == 0) {
        if ((++spins & 63u) == 0 && (aborted(c) || global_timer_ns() > gate_deadline)) {
          if (!aborted(c)) record_error(c, DeviceErrorKind::kTimeout, phase, c.rank, int64_t(c.timeout_ns));
          failed = 1;
          break;
        }
      }
    }
    __syncthreads();
  }
  return failed == 0;
}

// Host: launches `kernel` (a __global__ function taking one params struct) on `stream`; with
// `overlap_previous`, as a programmatic dependent of the kernel before it on the stream.
template <class Params>
void launch_kernel(void (*kernel)(Params), int grid, int block, size_t smem, cudaStream_t stream, bool overlap_previous,
                   const Params& params) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap_previous ? 1 : 0;
  launch_check(cudaLaunchKernelEx(&config, kernel, params), "cudaLaunchKernelEx");
}

// Host: lets `kernel` take up to `max_block_smem` bytes of shared memory per block in total (the
// device's opt-in limit): the dynamic part may use what the kernel's static shared memory leaves.
template <class Params>
void allow_dynamic_smem(void (*kernel)(Params), int max_block_smem) {
  cudaFuncAttributes attributes = {};
  launch_check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
  const int dynamic_bytes = max_block_smem - static_cast<int>(attributes.sharedSizeBytes);
  launch_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes),
               "cudaFuncSetAttribute");
}

}  // namespace epcomm::cuda::ll
