// The probe kernels (bench/probes/README.md): SM-issued write and read rates to a destination
// buffer (a peer GPU's memory over NVLink, or local HBM), and the latency from a store to a
// reader seeing it, for a release flag and for data-carrying flags.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace epcomm::probes {

constexpr int kMaxTargets = 8;

// Where each block writes (or reads): block b uses target b % count, at offset
// (b / count) * bytes_per_block of it; the targets are disjoint regions reserved for this GPU.
struct Targets {
  uint8_t* base[kMaxTargets];
  int count;
  int64_t bytes_per_block;
};

// Plain 16-byte stores (st.global.v4): `warps` warps per block, `unroll` stores in flight per thread.
void launch_store_v4(const Targets& targets, int blocks, int warps, int unroll, cudaStream_t stream);

// TMA bulk stores (cp.async.bulk.global.shared::cta): `issuers` threads per block (one per warp),
// each keeping `in_flight` bulk groups of `chunk_bytes` outstanding; a slot is reused after
// cp.async.bulk.wait_group.read (`read_wait`, the source was read) or the full wait (written).
// False when the combination does not fit in shared memory or is not compiled.
bool launch_tma_store(const Targets& targets, int blocks, int chunk_bytes, int issuers, int in_flight, bool read_wait,
                      cudaStream_t stream);

// TMA bulk reads into shared memory (cp.async.bulk.shared::cluster.global, mbarrier completion),
// `in_flight` chunks per block outstanding.
bool launch_tma_read(const Targets& targets, int blocks, int chunk_bytes, int in_flight, cudaStream_t stream);

enum class FlagKind : int { kRelease = 0, kDataCarrying = 1 };

// One side of a ping-pong of `payload_bytes` between two warps (two GPUs, or two blocks of one):
// side 0 sends first. kRelease: the payload with 16-byte stores, then fence.acq_rel.sys and a
// relaxed 8-byte flag store; the reader acquires the flag, then reads the payload. kDataCarrying
// (NCCL's LL idea): every 8-byte word holds 4 payload bytes and the sequence number, stored at once;
// the reader polls its words until every one carries the sequence number: no fence, no flag.
// `mine` is this side's receive area (local), `theirs` the other side's (possibly remote), each
// `area_bytes` long and zeroed before the launch. Writes the elapsed ns of `iterations` round
// trips to *elapsed_ns (side 0), or ~0 on a timeout (a side that never answered within 2 s).
struct PingPong {
  uint8_t* mine;
  uint8_t* theirs;
  int payload_bytes;
  int iterations;
  FlagKind kind;
  uint64_t* elapsed_ns;
};
// Both sides in one kernel of two blocks (one GPU): block b runs side b.
void launch_ping_pong_pair(const PingPong& side0, const PingPong& side1, cudaStream_t stream);
// One side per launch (two GPUs, launched concurrently).
void launch_ping_pong_side(const PingPong& side, int which, cudaStream_t stream);

// Bytes one side's receive area needs for `payload_bytes` of either kind (flag included).
int64_t ping_pong_area_bytes(int payload_bytes);

}  // namespace epcomm::probes
