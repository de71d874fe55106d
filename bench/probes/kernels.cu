#include <cuda_runtime.h>

#include "kernels.cuh"

namespace epcomm::probes {
namespace {

__device__ __forceinline__ uint8_t* block_region(const Targets& t) {
  return t.base[blockIdx.x % t.count] + int64_t(blockIdx.x / t.count) * t.bytes_per_block;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// ---- st.global.v4 ------------------------------------------------------------------------------

template <int kUnroll>
__global__ void store_v4_kernel(Targets t) {
  uint4* region = reinterpret_cast<uint4*>(block_region(t));
  const int64_t words = t.bytes_per_block / 16;
  const uint4 value = make_uint4(blockIdx.x, threadIdx.x, 0x5A5A5A5Au, 1u);
  const int64_t stride = int64_t(blockDim.x) * kUnroll;
  for (int64_t base = threadIdx.x; base < words; base += stride) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      if (i < words) region[i] = value;
    }
  }
}

// ---- TMA bulk stores ---------------------------------------------------------------------------

__device__ __forceinline__ void bulk_store(uint8_t* global, uint32_t shared, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global), "r"(shared), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}
template <int kPending>
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

// Thread 0 of each of the first `issuers` warps streams its share of the block's region: chunk c
// of issuer w goes to offset (c * issuers + w) * chunk_bytes, from slot c % kInFlight of its
// shared-memory slice.
template <int kInFlight, bool kReadWait>
__global__ void tma_store_kernel(Targets t, int chunk_bytes, int issuers) {
  extern __shared__ __align__(128) uint8_t staging[];
  const int slots = issuers * kInFlight;
  for (int i = threadIdx.x; i < slots * chunk_bytes / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(staging)[i] = i * 2654435761u;
  __syncthreads();
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 != 0 || warp >= issuers) return;
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic-proxy writes before TMA reads them
  uint8_t* region = block_region(t);
  const int64_t chunks = t.bytes_per_block / chunk_bytes / issuers;
  const uint32_t slice = static_cast<uint32_t>(__cvta_generic_to_shared(staging)) + warp * kInFlight * chunk_bytes;
  for (int64_t c = 0; c < chunks; ++c) {
    if (c >= kInFlight) {
      if constexpr (kReadWait)
        bulk_wait_read<kInFlight - 1>();
      else
        bulk_wait_all<kInFlight - 1>();
    }
    bulk_store(region + (c * issuers + warp) * chunk_bytes, slice + uint32_t(c % kInFlight) * chunk_bytes, chunk_bytes);
    bulk_commit();
  }
  bulk_wait_all<0>();
}

template <int kInFlight, bool kReadWait>
bool launch_tma_store_as(const Targets& t, int blocks, int chunk_bytes, int issuers, cudaStream_t stream) {
  const size_t shared = size_t(issuers) * kInFlight * chunk_bytes;
  auto kernel = tma_store_kernel<kInFlight, kReadWait>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  kernel<<<blocks, 32 * (issuers > 4 ? issuers : 4), shared, stream>>>(t, chunk_bytes, issuers);
  return cudaGetLastError() == cudaSuccess;
}

// ---- TMA bulk reads ----------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_expect(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
               : "=r"(done)
               : "r"(bar), "r"(parity)
               : "memory");
  return done != 0;
}
__device__ __forceinline__ void bulk_read(uint32_t shared, const uint8_t* global, int bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(shared),
               "l"(global), "r"(bytes), "r"(bar)
               : "memory");
}

// Thread 0 keeps `in_flight` chunk reads outstanding, one mbarrier per slot (parity flips per use).
template <int kInFlight>
__global__ void tma_read_kernel(Targets t, int chunk_bytes, uint32_t* sink) {
  extern __shared__ __align__(128) uint8_t landing[];
  __shared__ __align__(8) uint64_t bars[kInFlight];
  if (threadIdx.x != 0) return;
  const uint32_t first_bar = static_cast<uint32_t>(__cvta_generic_to_shared(bars));
  const uint32_t slots = static_cast<uint32_t>(__cvta_generic_to_shared(landing));
  for (int s = 0; s < kInFlight; ++s) mbarrier_init(first_bar + 8 * s);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const uint8_t* region = block_region(t);
  const int64_t chunks = t.bytes_per_block / chunk_bytes;
  const uint64_t deadline = global_ns() + 2000000000ull;  // bounded: 2 s
  for (int64_t c = 0; c < chunks + kInFlight; ++c) {
    const int slot = int(c % kInFlight);
    const uint32_t bar = first_bar + 8 * slot;
    if (c >= kInFlight) {  // the read issued kInFlight chunks ago
      const uint32_t parity = uint32_t((c / kInFlight - 1) & 1);
      while (!mbarrier_try_wait(bar, parity))
        if (global_ns() > deadline) {
          *sink = 0xFFFFFFFFu;
          return;
        }
    }
    if (c < chunks) {
      mbarrier_expect(bar, chunk_bytes);
      bulk_read(slots + uint32_t(slot) * chunk_bytes, region + c * chunk_bytes, chunk_bytes, bar);
    }
  }
  *sink += reinterpret_cast<const uint32_t*>(landing)[0];
}

template <int kInFlight>
bool launch_tma_read_as(const Targets& t, int blocks, int chunk_bytes, cudaStream_t stream) {
  static uint32_t* sink = nullptr;
  if (sink == nullptr && cudaMalloc(&sink, sizeof(uint32_t)) != cudaSuccess) return false;
  const size_t shared = size_t(kInFlight) * chunk_bytes;
  auto kernel = tma_read_kernel<kInFlight>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  kernel<<<blocks, 32, shared, stream>>>(t, chunk_bytes, sink);
  return cudaGetLastError() == cudaSuccess;
}

// ---- store -> flag latency ---------------------------------------------------------------------

constexpr int kFlagBytes = 128;  // the release flag's own line; the payload starts after it

struct SpinClock {
  uint64_t deadline;
  bool expired = false;
  __device__ bool tick() {
    if (global_ns() > deadline) expired = true;
    return !expired;
  }
};

__device__ void send(const PingPong& p, uint32_t seq) {
  const int lane = threadIdx.x % 32;
  if (p.kind == FlagKind::kRelease) {
    uint4* payload = reinterpret_cast<uint4*>(p.theirs + kFlagBytes);
    for (int i = lane; i < p.payload_bytes / 16; i += 32) payload[i] = make_uint4(seq, i, lane, 7u);
    __syncwarp();
    if (lane == 0) {
      asm volatile("fence.acq_rel.sys;" ::: "memory");
      asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p.theirs), "l"(uint64_t(seq)) : "memory");
    }
  } else {
    uint2* words = reinterpret_cast<uint2*>(p.theirs + kFlagBytes);
    for (int i = lane; i < p.payload_bytes / 4; i += 32)
      asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};" ::"l"(words + i), "r"(uint32_t(i) ^ seq), "r"(seq)
                   : "memory");
  }
}

// Returns a checksum of the payload (kept so the reads are not optimised away).
__device__ uint32_t receive(const PingPong& p, uint32_t seq, SpinClock& clock) {
  const int lane = threadIdx.x % 32;
  uint32_t sum = 0;
  if (p.kind == FlagKind::kRelease) {
    if (lane == 0) {
      uint64_t flag = 0;
      do {
        asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(flag) : "l"(p.mine) : "memory");
      } while (flag < seq && clock.tick());
    }
    __syncwarp();
    const uint4* payload = reinterpret_cast<const uint4*>(p.mine + kFlagBytes);
    for (int i = lane; i < p.payload_bytes / 16; i += 32) sum += __ldcg(payload + i).x;
  } else {
    const uint2* words = reinterpret_cast<const uint2*>(p.mine + kFlagBytes);
    for (int i = lane; i < p.payload_bytes / 4; i += 32) {
      uint32_t data = 0, flag = 0;
      do {
        asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];" : "=r"(data), "=r"(flag) : "l"(words + i) : "memory");
      } while (flag != seq && clock.tick());
      sum += data;
    }
    __syncwarp();
  }
  return sum;
}

__device__ void ping_pong(const PingPong& p, int which) {
  SpinClock clock{global_ns() + 2000000000ull};
  const uint64_t start = global_ns();
  uint32_t sum = 0;
  for (int it = 0; it < p.iterations; ++it) {
    const uint32_t seq = uint32_t(it + 1);
    if (which == 0) {
      send(p, seq);
      sum += receive(p, seq, clock);
    } else {
      sum += receive(p, seq, clock);
      send(p, seq);
    }
    if (__any_sync(0xFFFFFFFFu, clock.expired)) break;
  }
  const bool expired = __any_sync(0xFFFFFFFFu, clock.expired);
  if (which == 0 && threadIdx.x == 0) *p.elapsed_ns = expired ? ~0ull : global_ns() - start + (sum == 0x7FFFFFFF);
}

__global__ void ping_pong_pair_kernel(PingPong side0, PingPong side1) {
  ping_pong(blockIdx.x == 0 ? side0 : side1, blockIdx.x);
}

__global__ void ping_pong_side_kernel(PingPong side, int which) { ping_pong(side, which); }

}  // namespace

void launch_store_v4(const Targets& t, int blocks, int warps, int unroll, cudaStream_t stream) {
  const int threads = 32 * warps;
  switch (unroll) {
    case 1:
      store_v4_kernel<1><<<blocks, threads, 0, stream>>>(t);
      break;
    case 2:
      store_v4_kernel<2><<<blocks, threads, 0, stream>>>(t);
      break;
    case 4:
      store_v4_kernel<4><<<blocks, threads, 0, stream>>>(t);
      break;
    default:
      store_v4_kernel<8><<<blocks, threads, 0, stream>>>(t);
      break;
  }
}

bool launch_tma_store(const Targets& t, int blocks, int chunk_bytes, int issuers, int in_flight, bool read_wait,
                      cudaStream_t stream) {
  if (chunk_bytes % 16 != 0 || size_t(issuers) * in_flight * chunk_bytes > 227 * 1024) return false;
  switch (in_flight * 2 + (read_wait ? 1 : 0)) {
    case 2:
      return launch_tma_store_as<1, false>(t, blocks, chunk_bytes, issuers, stream);
    case 3:
      return launch_tma_store_as<1, true>(t, blocks, chunk_bytes, issuers, stream);
    case 4:
      return launch_tma_store_as<2, false>(t, blocks, chunk_bytes, issuers, stream);
    case 5:
      return launch_tma_store_as<2, true>(t, blocks, chunk_bytes, issuers, stream);
    case 8:
      return launch_tma_store_as<4, false>(t, blocks, chunk_bytes, issuers, stream);
    case 9:
      return launch_tma_store_as<4, true>(t, blocks, chunk_bytes, issuers, stream);
    case 16:
      return launch_tma_store_as<8, false>(t, blocks, chunk_bytes, issuers, stream);
    case 17:
      return launch_tma_store_as<8, true>(t, blocks, chunk_bytes, issuers, stream);
    default:
      return false;
  }
}

bool launch_tma_read(const Targets& t, int blocks, int chunk_bytes, int in_flight, cudaStream_t stream) {
  if (chunk_bytes % 16 != 0 || size_t(in_flight) * chunk_bytes > 220 * 1024) return false;
  switch (in_flight) {
    case 1:
      return launch_tma_read_as<1>(t, blocks, chunk_bytes, stream);
    case 2:
      return launch_tma_read_as<2>(t, blocks, chunk_bytes, stream);
    case 4:
      return launch_tma_read_as<4>(t, blocks, chunk_bytes, stream);
    case 8:
      return launch_tma_read_as<8>(t, blocks, chunk_bytes, stream);
    default:
      return false;
  }
}

void launch_ping_pong_pair(const PingPong& side0, const PingPong& side1, cudaStream_t stream) {
  ping_pong_pair_kernel<<<2, 32, 0, stream>>>(side0, side1);
}

void launch_ping_pong_side(const PingPong& side, int which, cudaStream_t stream) {
  ping_pong_side_kernel<<<1, 32, 0, stream>>>(side, which);
}

int64_t ping_pong_area_bytes(int payload_bytes) { return kFlagBytes + 2 * int64_t(payload_bytes); }

}  // namespace epcomm::probes
