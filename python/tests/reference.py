"""Inputs and single-process references for the Python tests (SPEC §3, §4), on CPU tensors.

Every rank builds its inputs from (seed, rank), gathers everyone's, and computes what it must receive.
Token rows carry their source in column 0 (rank) and column 1 (token index mod 256), so a misrouted
row says where it came from.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + rank)


def tokens(rank: int, num_tokens: int, hidden: int, seed: int) -> torch.Tensor:
    """[T, hidden] bf16, random, with (rank, token % 256) in the first two columns."""
    x = torch.randn(num_tokens, hidden, generator=generator(seed, rank)).to(torch.bfloat16)
    x[:, 0] = rank
    x[:, 1] = torch.arange(num_tokens) % 256
    return x


def dyadic_tokens(rank: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """bf16 multiples of 1/16 in [-4, 4]: products with 1/8-step weights and their sums stay exact in
    float32, so weighted sums have one correct answer whatever the order."""
    values = torch.randint(-64, 65, tuple(shape), generator=generator(seed, rank)).float() / 16
    return values.to(torch.bfloat16)


def routing(rank: int, num_tokens: int, num_topk: int, num_experts: int, seed: int,
            empty_slot_probability: float = 0.15) -> Tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [T, K] int64 with distinct experts per token and some -1 slots; token 0 goes nowhere,
    topk_weights [T, K] float32 in steps of 1/8, 0 where the slot is empty)."""
    g = generator(seed + 1, rank)
    topk_idx = torch.rand(num_tokens, num_experts, generator=g).topk(num_topk, dim=1).indices
    empty = torch.rand(num_tokens, num_topk, generator=g) < empty_slot_probability
    topk_idx[empty] = -1
    if num_tokens > 1:
        topk_idx[0] = -1
    weights = torch.randint(1, 9, (num_tokens, num_topk), generator=g).float() / 8
    weights[topk_idx < 0] = 0
    return topk_idx, weights


def duplicate_slots(topk_idx: torch.Tensor) -> torch.Tensor:
    """The same routing with each token's first expert repeated in its last slot (low-latency rule:
    a token appears once per expert however many slots name it)."""
    out = topk_idx.clone()
    if out.size(1) > 1:
        out[:, -1] = out[:, 0]
    return out


def layout(topk_idx: torch.Tensor, num_ranks: int, num_experts: int, ranks_per_node: int):
    """(num_tokens_per_rank [R], num_tokens_per_rdma_rank [N] or None, num_tokens_per_expert [E],
    is_token_in_rank [T, R]) as get_dispatch_layout computes them."""
    local = num_experts // num_ranks
    valid = topk_idx >= 0
    rank_of = torch.where(valid, topk_idx // local, torch.full_like(topk_idx, -1))
    in_rank = torch.stack([(rank_of == r).any(dim=1) for r in range(num_ranks)], dim=1)
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
    num_nodes = num_ranks // ranks_per_node
    per_rdma = None
    if num_nodes > 1:
        node_of = torch.where(valid, rank_of // ranks_per_node, torch.full_like(rank_of, -1))
        per_rdma = torch.stack([(node_of == n).any(dim=1) for n in range(num_nodes)], dim=1).sum(0).int()
    return in_rank.sum(0).int(), per_rdma, per_expert, in_rank


def dispatch(rank: int, num_experts: int, all_x: Sequence[torch.Tensor], all_in_rank: Sequence[torch.Tensor],
             all_topk: Optional[Sequence[torch.Tensor]] = None, all_weights: Optional[Sequence[torch.Tensor]] = None,
             expert_alignment: int = 1) -> Dict[str, object]:
    """What ``rank`` receives: rows grouped by source rank, then by token index (SPEC §3.2)."""
    num_ranks = len(all_x)
    local = num_experts // num_ranks
    rows, src_rank, src_idx, topk_rows, weight_rows = [], [], [], [], []
    for source in range(num_ranks):
        picked = all_in_rank[source][:, rank].nonzero().flatten()
        rows.append(all_x[source][picked])
        src_rank.append(torch.full((picked.numel(),), source, dtype=torch.int64))
        src_idx.append(picked)
        if all_topk is not None:
            topk = all_topk[source][picked]
            mine = (topk >= rank * local) & (topk < (rank + 1) * local)
            topk_rows.append(torch.where(mine, topk - rank * local, torch.full_like(topk, -1)))
            weight_rows.append(torch.where(mine, all_weights[source][picked], torch.zeros(())))
    matrix = torch.stack([all_in_rank[s].sum(0) for s in range(num_ranks)]).cumsum(0).int()
    result: Dict[str, object] = {
        "recv_x": torch.cat(rows), "src_rank": torch.cat(src_rank), "src_idx": torch.cat(src_idx),
        "rank_prefix_matrix": matrix,
    }
    if all_topk is not None:
        recv_topk = torch.cat(topk_rows)
        counts = [int((recv_topk == l).sum()) for l in range(local)]
        result["recv_topk_idx"] = recv_topk
        result["recv_topk_weights"] = torch.cat(weight_rows)
        result["counts"] = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]
    return result


def combine(rank: int, num_tokens: int, contributions: Sequence[torch.Tensor],
            sources: Sequence[Tuple[torch.Tensor, torch.Tensor]], bias: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The sum over receiving ranks (ascending) of their rows for each of ``rank``'s tokens, float32
    accumulation from 0, then the biases, one rounding (SPEC §3.3). ``contributions[r]`` are the rows
    rank r passed to combine, ``sources[r]`` = (src_rank, src_idx) of those rows."""
    width = contributions[0].shape[1:]
    acc = torch.zeros((num_tokens,) + tuple(width), dtype=torch.float32)
    for receiver, rows in enumerate(contributions):
        src_rank, src_idx = sources[receiver]
        mine = src_rank == rank
        acc[src_idx[mine]] += rows[mine].float()
    for b in bias:
        acc += b.float()
    return acc


def fp8_scales(x: torch.Tensor, round_scale: bool) -> torch.Tensor:
    """[N, hidden / 128] float32 scales of the FP8 cast (numerics.hpp's fp8_scale)."""
    blocks = x.float().view(x.size(0), -1, 128)
    amax = blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    scale = amax / FP8_MAX
    if round_scale:
        bits = scale.view(torch.int32)
        mantissa = bits & 0x7FFFFF
        scale = torch.where(mantissa == 0, bits, ((bits >> 23) + 1) << 23).view(torch.float32)
    return scale


def fp8_cast(x: torch.Tensor, round_scale: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [N, hidden], float32 scales [N, hidden / 128]): e4m3(x / s), saturating."""
    scale = fp8_scales(x, round_scale)
    scaled = x.float().view(x.size(0), -1, 128) / scale.unsqueeze(-1)
    return scaled.clamp(-FP8_MAX, FP8_MAX).view(x.shape).to(torch.float8_e4m3fn), scale


def ue8m0_pack(scale: torch.Tensor) -> torch.Tensor:
    """[N, S] power-of-two float32 scales -> [N, S / 4] int32, byte i of int j = exponent of scale 4j+i."""
    exponents = (scale.view(torch.int32) >> 23) & 0xFF
    groups = exponents.view(scale.size(0), -1, 4)
    packed = groups[..., 0] | (groups[..., 1] << 8) | (groups[..., 2] << 16) | (groups[..., 3] << 24)
    return packed.to(torch.int32)


def low_latency_rows(rank: int, num_experts: int, all_topk: Sequence[torch.Tensor]) -> List[List[Tuple[int, int]]]:
    """For each local expert of ``rank``: its (source rank, source token) rows in order (SPEC §4.1)."""
    num_ranks = len(all_topk)
    local = num_experts // num_ranks
    per_expert: List[List[Tuple[int, int]]] = []
    for l in range(local):
        expert = rank * local + l
        rows = []
        for source in range(num_ranks):
            hits = (all_topk[source] == expert).any(dim=1).nonzero().flatten().tolist()
            rows.extend((source, t) for t in hits)
        per_expert.append(rows)
    return per_expert


def low_latency_combine(rank: int, num_experts: int, max_tokens: int, topk_idx: torch.Tensor,
                        topk_weights: torch.Tensor, all_expert_x: Sequence[torch.Tensor],
                        all_rows: Sequence[List[List[Tuple[int, int]]]]) -> torch.Tensor:
    """[T, hidden] float32: sum over k of w[t, k] * (row of token t in the x of expert topk_idx[t, k]).
    Exact for dyadic inputs (see dyadic_tokens)."""
    num_ranks = len(all_expert_x)
    local = num_experts // num_ranks
    hidden = all_expert_x[0].size(-1)
    out = torch.zeros(topk_idx.size(0), hidden)
    for t in range(topk_idx.size(0)):
        for k in range(topk_idx.size(1)):
            expert = int(topk_idx[t, k])
            if expert < 0:
                continue
            owner, l = divmod(expert, local)
            slot = all_rows[owner][l].index((rank, t))
            out[t] += topk_weights[t, k] * all_expert_x[owner][l, slot].float()
    return out
