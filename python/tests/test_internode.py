"""High-throughput mode across emulated nodes (SPEC §3.6) on the CPU backend, with the checks DeepEP's
tests/test_internode.py makes: per-source data blocks through ``handle[-4]`` (recv_gbl_rank_prefix_sum),
counts, num_worst_tokens, cached dispatch, combine with bias and weights; plus what DeepEP's test
cannot see: bit-exact two-level combine numerics and the traffic counters at SPEC's minimum.
N x G in {2x1, 2x2, 4x1, 2x4, 4x2}."""
from __future__ import annotations

from typing import Any, List, Tuple

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, cpu, expect_error, normal_buffer
from epcomm._group import ranks_per_node_from_hosts, resolve_ranks_per_node
from epcomm.buffer import InternodeDispatchHandle

HIDDEN = 256
NUM_TOPK = 6
SHAPES = [(2, 1), (4, 2), (4, 1), (8, 4), (8, 2)]  # (R, G): N x G = 2x1, 2x2, 4x1, 2x4, 4x2


def num_tokens_of(rank: int, size: int) -> int:
    """Differs per rank; rank 1 has no tokens (and the last one too when R > 2)."""
    return 0 if rank == 1 or (rank == size - 1 and size > 2) else 20 + 9 * rank


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity measure (0 for equal tensors)."""
    x, y = x.double() + 1, y.double() + 1
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def fp8_cast(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per token and 128 channels, as DeepEP's per_token_cast_to_fp8: (e4m3 [T, hidden], scales [T, S])."""
    groups = x.float().view(x.size(0), x.size(1) // 128, 128)
    scales = (groups.abs().amax(dim=2).clamp(min=1e-4) / 448.0)
    return (groups / scales.unsqueeze(2)).view_as(x).to(torch.float8_e4m3fn), scales


def fp8_cast_back(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.float().view(x.size(0), x.size(1) // 128, 128) * scales.unsqueeze(2)).view(x.size(0), x.size(1))


def check_data(received: torch.Tensor, prefix: torch.Tensor, what: str) -> None:
    """DeepEP's check_data: rows of source s, [prefix[s-1], prefix[s]), all hold the value s."""
    received = cpu(received).float()
    assert torch.equal(received.amin(dim=1), received.amax(dim=1)), f"{what}: rows are not constant"
    start = 0
    for source, end in enumerate(cpu(prefix).tolist()):
        assert bool((received[start:end] == source).all()), f"{what}: rows [{start}, {end}) are not all {source}"
        start = end


def network_bytes_per_token(hidden: int, elem: int, num_topk: int, num_scales: int, num_ranks: int) -> int:
    """Dispatch: token index (4) + record (x, top-k int64 + float32, scales, routing flags [R], padded to 16)."""
    record = hidden * elem + num_topk * 12 + num_scales * 4 + num_ranks
    return 4 + (record + 15) // 16 * 16


def nodes_of(in_rank: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[T, N] bool: token t has a destination in node n."""
    return in_rank.view(in_rank.size(0), num_nodes, in_rank.size(1) // num_nodes).any(dim=2)


def two_level_combine(rows: List[torch.Tensor], in_rank: torch.Tensor, bias: Tuple[torch.Tensor, torch.Tensor],
                      ranks_per_node: int) -> torch.Tensor:
    """SPEC §3.6: p_n = bf16(sum over n's receiving ranks ascending, float32); acc = b0 + b1, then
    acc += p_n for nodes ascending; bf16(acc). ``rows[r]`` [T, hidden] is what rank r returns."""
    acc = bias[0].float() + bias[1].float()
    num_ranks = in_rank.size(1)
    for node in range(num_ranks // ranks_per_node):
        partial = torch.zeros_like(acc)
        received = torch.zeros(in_rank.size(0), dtype=torch.bool)
        for r in range(node * ranks_per_node, (node + 1) * ranks_per_node):
            mask = in_rank[:, r].unsqueeze(1)
            partial = torch.where(mask, partial + rows[r].float(), partial)
            received |= in_rank[:, r]
        acc = torch.where(received.unsqueeze(1), acc + partial.to(torch.bfloat16).float(), acc)
    return acc.to(torch.bfloat16)


# ---- rank-side checks ----------------------------------------------------------------------------

def check_internode(ctx: Any, ranks_per_node: int) -> None:
    R, G, rank = ctx.size, ranks_per_node, ctx.rank
    N = R // G
    buffer = normal_buffer(ctx, HIDDEN, ranks_per_node=G)
    assert buffer.num_nodes == N
    num_experts, L = 4 * R, 4
    T = num_tokens_of(rank, R)
    g = ref.generator(31, rank)
    x = torch.ones(T, HIDDEN, dtype=torch.bfloat16) * rank
    x_pure_rand = torch.randn(T, HIDDEN, generator=g).to(torch.bfloat16)
    x_e4m3 = fp8_cast(x)
    scores = torch.randn(T, num_experts, generator=g).abs() + 1
    topk_idx = scores.topk(NUM_TOPK, dim=1).indices
    topk_idx[torch.rand(T, NUM_TOPK, generator=g) < 0.1] = -1
    topk_weights = torch.ones(T, NUM_TOPK) * rank
    topk_weights_pure_rand = torch.randn(T, NUM_TOPK, generator=g)

    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    expected = ref.layout(topk_idx, R, num_experts, G)
    assert_equal(per_rank, expected[0], "num_tokens_per_rank")
    assert_equal(per_rdma, expected[1], "num_tokens_per_rdma_rank")
    assert_equal(per_expert, expected[2], "num_tokens_per_expert")
    assert_equal(in_rank, expected[3], "is_token_in_rank")
    everyone = ctx.gather((per_rank, per_expert, in_rank))
    gbl_per_rank = sum(e[0] for e in everyone)
    gbl_per_expert = sum(e[1] for e in everyone)
    all_in_rank = [e[2] for e in everyone]

    crossing = nodes_of(in_rank, N).sum(dim=0).tolist()
    crossing[rank // G] = 0
    # combine: as the forwarder of this node for source m*G + rank%G, one row per token this node received
    forwarded = [0] * N
    for m in range(N):
        if m != rank // G:
            forwarded[m] = int(nodes_of(all_in_rank[m * G + rank % G], N)[:, rank // G].sum())

    for current_x in (x_pure_rand, x, x_e4m3):
        fp8 = isinstance(current_x, tuple)
        for with_topk in (False, True):
            what = f"{'fp8' if fp8 else 'bf16'}{' rand' if current_x is x_pure_rand else ''}" \
                   f"{' topk' if with_topk else ''}"
            args = dict(x=current_x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            weights = topk_weights_pure_rand if current_x is x_pure_rand else topk_weights
            if with_topk:
                args.update(topk_idx=topk_idx, topk_weights=weights)
            recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.internode_dispatch(**args)
            recv = fp8_cast_back(*recv_x) if fp8 else recv_x

            # the handle: 10 elements, DeepEP's element 0 and -4
            assert isinstance(handle, InternodeDispatchHandle) and len(handle) == 10, what
            assert_equal(handle[0], in_rank, f"{what}: handle[0] (is_token_in_rank)")
            prefix = handle[-4]
            received_from = torch.tensor([int(e[:, rank].sum()) for e in all_in_rank], dtype=torch.int32)
            assert_equal(prefix, received_from.cumsum(0).int(), f"{what}: recv_gbl_rank_prefix_sum")
            assert_equal(handle.recv_rdma_rank_prefix_sum, received_from.view(N, G).sum(1).cumsum(0).int(),
                         f"{what}: recv_rdma_rank_prefix_sum")
            assert_equal(handle.recv_src_rank, torch.repeat_interleave(torch.arange(R), received_from).int(),
                         f"{what}: recv_src_rank")
            assert_equal(handle.forwarder_rank, torch.arange(N, dtype=torch.int32) * G + rank % G,
                         f"{what}: forwarder_rank")

            # DeepEP's checks: counts, per-source blocks, top-k
            assert int(gbl_per_rank[rank]) == recv.size(0), what
            assert gbl_per_expert.view(R, -1)[rank].tolist() == counts, what
            if current_x is not x_pure_rand:
                check_data(recv, prefix, f"{what}: recv_x")
            if with_topk:
                local = recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (recv_topk_idx < L))
                assert bool(local.all()), f"{what}: recv_topk_idx outside [-1, L)"
                for i, count in enumerate(counts):
                    assert int(recv_topk_idx.eq(i).sum()) == count, f"{what}: expert {i}"
                assert bool((recv_topk_weights[recv_topk_idx.eq(-1)] == 0).all()), f"{what}: weights of -1 slots"
                if current_x is not x_pure_rand:
                    filled = recv_topk_weights.clone()
                    filled[recv_topk_idx.eq(-1)] = filled.amax(dim=1, keepdim=True).expand_as(filled)[
                        recv_topk_idx.eq(-1)]
                    check_data(filled, prefix, f"{what}: recv_topk_weights")
            elem, scales = (1, HIDDEN // 128) if fp8 else (2, 0)
            per_token = network_bytes_per_token(HIDDEN, elem, NUM_TOPK if with_topk else 0, scales, R)
            assert buffer.get_network_bytes_per_node() == [n * per_token for n in crossing], f"{what}: traffic"

            # num_worst_tokens: exactly that many rows, padding rows carry no expert, no count list
            if with_topk:
                num_worst = int(gbl_per_rank.max()) + 3
                worst = buffer.internode_dispatch(**args, num_worst_tokens=num_worst)
                worst_x = worst[0][0] if fp8 else worst[0]
                assert worst_x.size(0) == num_worst and worst[3] == [], what
                assert bool(worst[1][recv.size(0):].eq(-1).all()), f"{what}: worst-case padding rows"
                assert_equal(worst[1][:recv.size(0)], recv_topk_idx, f"{what}: worst-case recv_topk_idx")
                assert worst[4][-4].tolist() == prefix.tolist(), f"{what}: worst-case recv_gbl_rank_prefix_sum"

            # cached dispatch with the handle
            cached = buffer.internode_dispatch(current_x, handle=handle)
            assert cached[1] is None and cached[4] is None, what
            cached_recv = fp8_cast_back(*cached[0]) if fp8 else cached[0]
            assert_equal(cached_recv, recv, f"{what}: cached recv_x")
            assert buffer.get_network_bytes_per_node() == \
                [n * network_bytes_per_token(HIDDEN, elem, 0, scales, R) for n in crossing], f"{what}: cached traffic"

            # combine with two biases (and the weights): DeepEP's tolerance check and our bit-exact one
            if fp8:
                continue
            bias_0 = torch.ones(T, HIDDEN, dtype=torch.bfloat16)
            bias_1 = torch.randn(T, HIDDEN, generator=g).to(torch.bfloat16)
            combine_args = dict(x=recv_x, handle=handle, bias=(bias_0, bias_1))
            if with_topk:
                combine_args.update(topk_weights=recv_topk_weights)
            combined_x, combined_weights, _ = buffer.internode_combine(**combine_args)
            check_x = (combined_x.float() - bias_0.float() - bias_1.float()) / in_rank.sum(dim=1).clamp(min=1).unsqueeze(1)
            reached = in_rank.any(dim=1)
            ref_x = current_x
            if bool(reached.any()):
                assert calc_diff(check_x[reached], ref_x[reached].float()) < 5e-6, f"{what}: combined_x"
            assert_equal(combined_x, two_level_combine([current_x] * R, in_rank, (bias_0, bias_1), G),
                         f"{what}: combined_x (two-level order, bit for bit)")
            if with_topk:
                assert_equal(combined_weights, torch.where(topk_idx >= 0, weights, torch.zeros_like(weights)),
                             f"{what}: combined_topk_weights")
            weight_bytes = 4 * NUM_TOPK if with_topk else 0
            assert buffer.get_network_bytes_per_node() == [n * (2 * HIDDEN + weight_bytes) for n in forwarded], \
                f"{what}: combine traffic"
    buffer.destroy()


def check_order_sensitive_combine(ctx: Any, ranks_per_node: int) -> bool:
    """Each receiver returns its own scaled rows (so the nodes' partials differ): bit for bit against
    the two-level reference, which differs from the one-level order on these values."""
    R, G, rank = ctx.size, ranks_per_node, ctx.rank
    buffer = normal_buffer(ctx, HIDDEN, ranks_per_node=G)
    num_experts = 4 * R
    T = num_tokens_of(rank, R)
    x = ref.tokens(rank, T, HIDDEN, seed=5) * 37
    topk_idx, weights = ref.routing(rank, T, NUM_TOPK, num_experts, seed=5)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                 topk_weights=weights)
    expert_out = (recv_x.float() * (1.0 + 0.37 * rank)).to(torch.bfloat16)
    bias = (torch.randn(T, HIDDEN, generator=ref.generator(6, rank)) * 3).to(torch.bfloat16)
    combined, _, _ = buffer.combine(expert_out, handle, bias=bias)
    everyone = ctx.gather(x)
    rows = [(everyone[rank].float() * (1.0 + 0.37 * r)).to(torch.bfloat16) for r in range(R)]
    zeros = torch.zeros(T, HIDDEN, dtype=torch.bfloat16)
    expected = two_level_combine(rows, in_rank, (bias, zeros), G)
    assert_equal(combined, expected, "combined_x (two-level order)")
    buffer.destroy()
    return bool((expected != two_level_combine(rows, in_rank, (bias, zeros), R)).any())


def check_node_size(ctx: Any) -> None:
    """Buffer's ranks_per_node: explicit, else $EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE, else hosts."""
    import os
    saved = {v: os.environ.pop(v, None) for v in ("EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE")}
    try:
        def node_size(**kwargs: Any) -> int:
            buffer = epcomm.Buffer(ctx.group, num_nvl_bytes=1 << 16, **kwargs)
            size = buffer.ranks_per_node
            assert buffer.runtime.ranks_per_node == size
            buffer.destroy()
            return size
        assert node_size() == ctx.size, "one host: one node"
        os.environ["LOCAL_WORLD_SIZE"] = "1"
        assert node_size() == 1
        os.environ["EPCOMM_RANKS_PER_NODE"] = str(ctx.size // 2)
        assert node_size() == ctx.size // 2
        assert node_size(ranks_per_node=ctx.size) == ctx.size
    finally:
        for variable, value in saved.items():
            os.environ.pop(variable, None)
            if value is not None:
                os.environ[variable] = value


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.worlds("cpu2", "cpu4", "cpu8")
@pytest.mark.parametrize("ranks_per_node", [1, 2, 4])
def test_internode_like_deep_ep(world, ranks_per_node: int) -> None:
    if (world.size, ranks_per_node) not in SHAPES:
        pytest.skip(f"N x G = {world.size // ranks_per_node} x {ranks_per_node} is not in the matrix")
    world.run(check_internode, ranks_per_node)


@pytest.mark.worlds("cpu4", "cpu8")
@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_two_level_combine_order(world, ranks_per_node: int) -> None:
    if (world.size, ranks_per_node) not in SHAPES:
        pytest.skip(f"N x G = {world.size // ranks_per_node} x {ranks_per_node} is not in the matrix")
    differs = world.run(check_order_sensitive_combine, ranks_per_node)
    assert any(differs), "the data does not tell the two-level order from the one-level one"


@pytest.mark.worlds("cpu2")
def test_node_size_from_environment(world) -> None:
    world.run(check_node_size)


@pytest.mark.parametrize("variable", ["EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"])
def test_node_size_variables_are_read_as_the_cpp_table_reads_them(variable: str, monkeypatch) -> None:
    """What src/core/environment.cpp's parse_int accepts (strtoll, nothing around it, in [1, 2^31-1]),
    the Python front end accepts too, and it refuses the rest naming the variable."""
    for other in ("EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(other, raising=False)
    for text, expected in (("4", 4), ("+2", 2), ("03", 3), ("2147483647", 16)):
        monkeypatch.setenv(variable, text)
        assert resolve_ranks_per_node(16) == expected, text
    monkeypatch.setenv(variable, "")
    assert resolve_ranks_per_node(16) == 8, "empty counts as unset"
    for text in (" 4", "4 ", "4_0", "\u0664", "4.0", "0x4", "0", "-1", "2147483648", "four"):
        monkeypatch.setenv(variable, text)
        expect_error(epcomm.InvalidArgumentError, (variable, "expected an integer in [1, 2147483647]", repr(text)),
                     lambda: resolve_ranks_per_node(16))


def test_node_size_from_host_names() -> None:
    assert ranks_per_node_from_hosts(["a", "a", "b", "b"]) == 2
    assert ranks_per_node_from_hosts(["a"] * 8) == 8
    expect_error(epcomm.InvalidArgumentError, ("different numbers", "a: 3", "b: 1"),
                 lambda: ranks_per_node_from_hosts(["a", "a", "a", "b"]))
    expect_error(epcomm.InvalidArgumentError, ("consecutive",), lambda: ranks_per_node_from_hosts(["a", "b", "a", "b"]))
    expect_error(epcomm.InvalidArgumentError, ("more than 8",), lambda: ranks_per_node_from_hosts(["a"] * 16))
