#!/usr/bin/env python3
"""The numbers of docs/SCALE_OUT.md: a model of normal mode (SPEC §3.6) for EP16..EP256 on nodes of
8 x H200, one 400 Gb/s NIC per GPU, for the `normal` workload of BENCHMARKS.md (4096 tokens per rank,
hidden 7168, top-8 of 256 experts).

Everything printed is computed here from the stated inputs (exact hypergeometric expectations, the
Config size formula of src/core/config.cpp, a seeded Monte Carlo for the incast of skewed routing).
Standard library only: `python3 scripts/scale_out_model.py` (add --markdown for the doc's tables).
"""
from __future__ import annotations

import argparse
import random
from math import comb

# ---- inputs ---------------------------------------------------------------------------------------
TOKENS = 4096            # per rank (BENCHMARKS.md `normal`)
HIDDEN = 7168
TOPK = 8
EXPERTS = 256
G = 8                    # GPUs (ranks) per node
EP_SIZES = [16, 32, 64, 128, 256]
NODE_LIMIT = 4           # DeepSeek-V3 / DeepEP's test: top-4 groups (= nodes) per token, then top-8
NIC_LINE_GBPS = 400 / 8  # 400 Gb/s per GPU -> 50 GB/s per direction
NIC_EFFICIENCY = 0.90    # assumed share of line rate a well-fed RDMA write stream reaches (DeepEP: 0.86-0.94)
NVLINK_GBPS = 370.0      # H200 SM-issued NVLink writes, effective per direction (BENCHMARKS.md ceilings)
DEEPEP_RDMA_GBPS = {16: (43, 43), 32: (44, 47), 64: (46, 45)}  # V1 README: (dispatch, combine), H800 + CX7
BF16_BYTES = HIDDEN * 2                  # 14336
FP8_BYTES = HIDDEN + HIDDEN // 128 * 4   # 7392: e4m3 payload + float32 scales
TOPK_BYTES = TOPK * (8 + 4)              # indices and weights that travel with a fresh dispatch
# Config defaults (SPEC §6, src/core/config.cpp): num_sms 20, rdma recv queue 128 tokens, send chunk 6.
NUM_SMS, RDMA_RECV_TOKENS, RDMA_SEND_TOKENS, NVL_RECV_TOKENS = 20, 128, 6, 256
CONTROL_BYTES = 1 << 20
MAX_TOPK = 32


def p_hit(pool: int, owned: int, picks: int) -> float:
    """P(at least one of `picks` distinct experts drawn uniformly from `pool` lies in a set of `owned`)."""
    return 1.0 - comb(pool - owned, picks) / comb(pool, picks)


def routing_stats(ep: int, node_limited: bool) -> dict:
    """Per token: expected destination ranks, nodes, remote nodes, NVLink copies (SPEC §3.6 transport:
    one network copy per remote node to its forwarder, then NVLink copies to the other receivers of the
    node; the forwarder itself and the source on its own node need none)."""
    nodes = ep // G
    local = EXPERTS // ep  # experts per rank
    chosen_nodes = min(nodes, NODE_LIMIT) if node_limited else nodes
    pool = chosen_nodes * G * local
    q_rank = p_hit(pool, local, TOPK)        # a rank of a chosen node receives the token
    q_node = p_hit(pool, G * local, TOPK)    # a chosen node receives it
    ranks = chosen_nodes * G * q_rank
    touched = chosen_nodes * q_node
    remote = touched * (nodes - 1) / nodes   # own node is chosen as often as any other (symmetry)
    nvlink = chosen_nodes * (G - 1) * q_rank  # per touched node: receivers minus its forwarder
    return dict(nodes=nodes, ranks=ranks, touched=touched, remote=remote, nvlink=nvlink)


def rdma_buffer_bytes(nodes: int) -> int:
    """Config::rdma_buffer_size_hint (src/core/config.cpp) with the default Config."""
    record = (16 + BF16_BYTES + MAX_TOPK * 8 + 15) // 16 * 16
    return CONTROL_BYTES + 2 * nodes * (NUM_SMS // 2) * RDMA_RECV_TOKENS * record


def nvl_buffer_bytes(ranks_in_domain: int) -> int:
    """NormalLayout::total_bytes (src/core/layouts.hpp) for the NVLink peers of one node."""
    record = (16 + BF16_BYTES + MAX_TOPK * 8 + 15) // 16 * 16
    return CONTROL_BYTES + ranks_in_domain * (NUM_SMS // 2) * NVL_RECV_TOKENS * record


def skewed_incast(ep: int, draws: int = 400, seed: int = 12) -> float:
    """BENCHMARKS.md skew (20% of experts draw 80% of the selections), hot set placed at random: the
    mean over draws of (busiest node's share / average node's share) of expert selections, i.e. the
    factor by which the busiest node's NIC ingress exceeds the uniform case."""
    rng = random.Random(seed + ep)
    nodes = ep // G
    per_node = EXPERTS // nodes
    hot_count = EXPERTS // 5
    total = 0.0
    for _ in range(draws):
        hot = set(rng.sample(range(EXPERTS), hot_count))
        load = []
        for n in range(nodes):
            experts = range(n * per_node, (n + 1) * per_node)
            h = sum(1 for e in experts if e in hot)
            load.append(h * 0.8 / hot_count + (per_node - h) * 0.2 / (EXPERTS - hot_count))
        total += max(load) / (sum(load) / nodes)
    return total / draws


def rows(node_limited: bool) -> list:
    out = []
    for ep in EP_SIZES:
        s = routing_stats(ep, node_limited)
        net_rows, nvl_rows = TOKENS * s["remote"], TOKENS * s["nvlink"]
        nic = NIC_LINE_GBPS * NIC_EFFICIENCY
        row = dict(ep=ep, **s)
        for name, token_bytes in (("bf16", BF16_BYTES), ("fp8", FP8_BYTES)):
            row[f"net_mb_{name}"] = net_rows * token_bytes / 1e6
            row[f"nvl_mb_{name}"] = nvl_rows * token_bytes / 1e6
            row[f"t_net_{name}"] = net_rows * token_bytes / (nic * 1e3)  # us
            row[f"t_nvl_{name}"] = nvl_rows * token_bytes / (NVLINK_GBPS * 1e3)
        # combine: one bf16 partial per (token, remote node) over the network, the NVLink rows reversed
        row["t_combine"] = max(row["t_net_bf16"], row["t_nvl_bf16"])
        row["t_dispatch_fp8"] = max(row["t_net_fp8"], row["t_nvl_fp8"])
        row["t_dispatch_bf16"] = max(row["t_net_bf16"], row["t_nvl_bf16"])
        row["rdma_buffer_mb"] = rdma_buffer_bytes(s["nodes"]) / 1e6
        row["incast"] = skewed_incast(ep)
        out.append(row)
    return out


def print_tables(markdown: bool) -> None:
    bar = "|" if markdown else " "
    for node_limited in (False, True):
        title = "node-limited routing (top-4 nodes, then top-8; DeepEP's test)" if node_limited \
            else "uniform top-8 of 256 (BENCHMARKS.md routing)"
        print(f"\n{title}")
        head = ["EP", "N", "ranks/token", "nodes/token", "remote nodes/token", "NVLink copies/token",
                "net MB/rank BF16", "net MB/rank FP8", "NVLink MB/rank BF16", "NVLink MB/rank FP8",
                "dispatch FP8 us", "dispatch BF16 us", "combine us"]
        if markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
        else:
            print("  ".join(head))
        for r in rows(node_limited):
            cells = [r["ep"], r["nodes"], f"{r['ranks']:.2f}", f"{r['touched']:.2f}", f"{r['remote']:.2f}",
                     f"{r['nvlink']:.2f}", f"{r['net_mb_bf16']:.0f}", f"{r['net_mb_fp8']:.0f}",
                     f"{r['nvl_mb_bf16']:.0f}", f"{r['nvl_mb_fp8']:.0f}", f"{r['t_dispatch_fp8']:.0f}",
                     f"{r['t_dispatch_bf16']:.0f}", f"{r['t_combine']:.0f}"]
            print((f"{bar} " + f" {bar} ".join(str(c) for c in cells) + f" {bar}") if markdown
                  else "  ".join(str(c) for c in cells))
    print("\nlimits")
    head = ["EP", "N", "RDMA buffer hint MB (default Config)", "NVLink buffer, G peers, MB", "peers per NIC",
            "skewed incast factor (busiest node / mean)"]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    for r in rows(False):
        cells = [r["ep"], r["nodes"], f"{r['rdma_buffer_mb']:.0f}", f"{nvl_buffer_bytes(G) / 1e6:.0f}",
                 r["nodes"] - 1, f"{r['incast']:.2f}"]
        print((f"{bar} " + f" {bar} ".join(str(c) for c in cells) + f" {bar}") if markdown
              else "  ".join(str(c) for c in cells))
    print("\nDeepEP V1 published (H800, CX7 400 Gb/s, node-limited routing, FP8 dispatch / BF16 combine):")
    for ep, (d, c) in DEEPEP_RDMA_GBPS.items():
        s = routing_stats(ep, True)
        net = TOKENS * s["remote"]
        print(f"  EP{ep}: {d} / {c} GB/s RDMA -> dispatch FP8 {net * FP8_BYTES / (d * 1e3):.0f} us, "
              f"combine {net * BF16_BYTES / (c * 1e3):.0f} us for this model's network bytes")
    chunk = RDMA_SEND_TOKENS * (16 + BF16_BYTES + MAX_TOPK * 8)
    print(f"\nqueue depth: one RDMA chunk of {RDMA_SEND_TOKENS} BF16 tokens = {chunk / 1e3:.0f} KB; "
          f"bytes in flight to fill {NIC_LINE_GBPS:.0f} GB/s = 50 KB per us of round trip; "
          f"{NUM_SMS // 2} channels x (N - 1) peers each keep one chunk in flight")
    print(f"topk metadata: {TOPK_BYTES} B per token ({100 * TOPK_BYTES / BF16_BYTES:.1f} % of BF16, "
          f"{100 * TOPK_BYTES / FP8_BYTES:.1f} % of FP8), not in the tables (DeepEP's figures omit it too)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    print_tables(parser.parse_args().markdown)
