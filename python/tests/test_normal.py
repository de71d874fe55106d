"""High-throughput mode through the Python surface (SPEC §3): layout, dispatch (bf16, FP8, cached,
worst-case rows, routing without top-k), combine (bias, weights), events and streams, configs."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, cpu, expect_error, normal_buffer

HIDDEN = 256
NUM_TOKENS = 24
NUM_TOPK = 4


def num_experts_for(ctx: Any) -> int:
    return 4 * ctx.size


def make_inputs(ctx: Any, seed: int, num_tokens: int = NUM_TOKENS, hidden: int = HIDDEN, num_topk: int = NUM_TOPK):
    x = ref.tokens(ctx.rank, num_tokens + ctx.rank, hidden, seed)  # ranks differ in T
    topk_idx, weights = ref.routing(ctx.rank, num_tokens + ctx.rank, num_topk, num_experts_for(ctx), seed)
    return x, topk_idx, weights


def to_device(ctx: Any, *tensors: Any) -> Any:
    return tuple(t.to(ctx.device) if isinstance(t, torch.Tensor) else t for t in tensors)


# ---- rank-side checks ----------------------------------------------------------------------------

def check_layout(ctx: Any, ranks_per_node: int) -> None:
    buffer = normal_buffer(ctx, HIDDEN, ranks_per_node=ranks_per_node)
    _, topk_idx, _ = make_inputs(ctx, seed=1)
    num_experts = num_experts_for(ctx)
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(topk_idx.to(ctx.device), num_experts)
    expected = ref.layout(topk_idx, ctx.size, num_experts, ranks_per_node)
    assert_equal(per_rank, expected[0], "num_tokens_per_rank")
    if expected[1] is None:
        assert per_rdma is None, "num_tokens_per_rdma_rank must be None within one node"
    else:
        assert_equal(per_rdma, expected[1], "num_tokens_per_rdma_rank")
    assert_equal(per_expert, expected[2], "num_tokens_per_expert")
    assert_equal(in_rank, expected[3], "is_token_in_rank")
    assert isinstance(event, epcomm.EventOverlap) and event.event is None
    # int32 indices give the same layout
    again = buffer.get_dispatch_layout(topk_idx.int().to(ctx.device), num_experts)
    assert_equal(again[0], expected[0], "num_tokens_per_rank (int32 topk_idx)")
    buffer.destroy()


def check_dispatch_combine(ctx: Any, expert_alignment: int, bias_count: int, use_internode_names: bool) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, weights = make_inputs(ctx, seed=2)
    num_experts = num_experts_for(ctx)
    per_rank, per_rdma, per_expert, in_rank = ref.layout(topk_idx, ctx.size, num_experts, ctx.size)
    dispatch = buffer.internode_dispatch if use_internode_names else buffer.dispatch
    combine = buffer.internode_combine if use_internode_names else buffer.combine
    d_x, d_topk, d_weights, d_per_rank, d_in_rank, d_per_expert = to_device(
        ctx, x, topk_idx, weights, per_rank, in_rank, per_expert)
    recv_x, recv_topk, recv_weights, counts, handle, event = dispatch(
        d_x, num_tokens_per_rank=d_per_rank, is_token_in_rank=d_in_rank, num_tokens_per_expert=d_per_expert,
        topk_idx=d_topk, topk_weights=d_weights, expert_alignment=expert_alignment)

    everyone = ctx.gather((x, topk_idx, weights, in_rank))
    expected = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], [e[3] for e in everyone],
                            [e[1] for e in everyone], [e[2] for e in everyone], expert_alignment)
    assert_equal(recv_x, expected["recv_x"], "recv_x")
    assert_equal(recv_topk, expected["recv_topk_idx"], "recv_topk_idx")
    assert_equal(recv_weights, expected["recv_topk_weights"], "recv_topk_weights")
    assert counts == expected["counts"], f"num_recv_tokens_per_expert_list {counts} != {expected['counts']}"
    assert isinstance(counts, list) and all(isinstance(c, int) for c in counts)
    assert isinstance(handle, tuple) and isinstance(handle, epcomm.DispatchHandle)
    assert_equal(handle[0], expected["rank_prefix_matrix"], "handle[0] (rank_prefix_matrix)")
    assert_equal(handle.recv_src_idx, expected["src_idx"].int(), "handle.recv_src_idx")
    assert event.event is None

    # combine: every receiver scales its rows by (rank + 1), so the sum tells the ranks apart
    contribution = (recv_x.float() * (ctx.rank + 1)).to(torch.bfloat16)
    bias = tuple(ref.tokens(ctx.rank + 100 * (i + 1), x.size(0), HIDDEN, seed=3) for i in range(bias_count))
    bias_arg = None if bias_count == 0 else (bias[0].to(ctx.device) if bias_count == 1 else to_device(ctx, *bias))
    combined, combined_weights, event = combine(contribution, handle, topk_weights=recv_weights, bias=bias_arg)
    received = ctx.gather((cpu(contribution), expected["src_rank"], expected["src_idx"], cpu(recv_weights)))
    sums = ref.combine(ctx.rank, x.size(0), [r[0] for r in received], [(r[1], r[2]) for r in received], bias)
    assert_equal(combined, sums.to(torch.bfloat16), "combined_x")
    weight_sums = ref.combine(ctx.rank, x.size(0), [r[3] for r in received], [(r[1], r[2]) for r in received])
    assert_equal(combined_weights, weight_sums, "combined_topk_weights")
    # passing dispatch's recv_topk_weights back reconstructs the original weights
    assert_equal(combined_weights, weights, "combined_topk_weights vs topk_weights")
    assert event.event is None

    # without topk_weights, no combined weights
    combined_only, none_weights, _ = combine(contribution, handle)
    assert none_weights is None
    unbiased = ref.combine(ctx.rank, x.size(0), [r[0] for r in received], [(r[1], r[2]) for r in received])
    assert_equal(combined_only, unbiased.to(torch.bfloat16), "combined_x (no bias)")
    buffer.destroy()


def check_fp8_dispatch(ctx: Any, column_major_scales: bool) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, weights = make_inputs(ctx, seed=4)
    x_fp8, scales = ref.fp8_cast(x, round_scale=False)
    if column_major_scales:
        scales = scales.t().contiguous().t()
        assert scales.stride(1) != 1
    num_experts = num_experts_for(ctx)
    per_rank, _, per_expert, in_rank = ref.layout(topk_idx, ctx.size, num_experts, ctx.size)
    (recv_fp8, recv_scales), recv_topk, _, counts, handle, _ = buffer.dispatch(
        to_device(ctx, x_fp8, scales), num_tokens_per_rank=per_rank.to(ctx.device),
        is_token_in_rank=in_rank.to(ctx.device), num_tokens_per_expert=per_expert.to(ctx.device),
        topk_idx=topk_idx.to(ctx.device), topk_weights=weights.to(ctx.device))
    everyone = ctx.gather((x_fp8, scales.contiguous(), topk_idx, weights, in_rank))
    in_ranks = [e[4] for e in everyone]
    expected_fp8 = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], in_ranks)["recv_x"]
    expected_scales = ref.dispatch(ctx.rank, num_experts, [e[1] for e in everyone], in_ranks)["recv_x"]
    assert_equal(recv_fp8, expected_fp8, "recv_x (fp8)")
    assert_equal(recv_scales, expected_scales, "recv_x_scales")
    if column_major_scales:
        assert recv_scales.size(0) <= 1 or recv_scales.stride() == (1, recv_scales.size(0)), \
            f"column-major scales expected, got strides {recv_scales.stride()}"
    else:
        assert recv_scales.is_contiguous()
    # FP8 cached dispatch returns a pair too
    (cached_fp8, cached_scales), *rest = buffer.dispatch(to_device(ctx, x_fp8, scales), handle=handle)
    assert_equal(cached_fp8, expected_fp8, "cached recv_x (fp8)")
    assert_equal(cached_scales, expected_scales, "cached recv_x_scales")
    assert rest[:4] == [None, None, None, None]
    buffer.destroy()


def check_cached_dispatch(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, weights = make_inputs(ctx, seed=5)
    num_experts = num_experts_for(ctx)
    per_rank, _, per_expert, in_rank = buffer.get_dispatch_layout(topk_idx.to(ctx.device), num_experts)[:4]
    first = buffer.dispatch(x.to(ctx.device), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=topk_idx.to(ctx.device),
                            topk_weights=weights.to(ctx.device))
    handle = first[4]
    y = ref.tokens(ctx.rank + 50, x.size(0), HIDDEN, seed=6)  # new data, same routing
    result = buffer.dispatch(y.to(ctx.device), handle=handle)
    assert len(result) == 6 and result[1:5] == (None, None, None, None), \
        "cached dispatch returns (recv_x, None, None, None, None, event)"
    assert isinstance(result[5], epcomm.EventOverlap)
    everyone = ctx.gather((y, cpu(in_rank)))
    expected = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], [e[1] for e in everyone])
    assert_equal(result[0], expected["recv_x"], "cached recv_x")
    # cached dispatch is the backward of combine: combine of the grads gives sums over receivers
    combined, _, _ = buffer.combine(result[0], handle)
    assert combined.shape == y.shape
    buffer.destroy()


def check_worst_tokens(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, weights = make_inputs(ctx, seed=7)
    num_experts = num_experts_for(ctx)
    per_rank, _, per_expert, in_rank = ref.layout(topk_idx, ctx.size, num_experts, ctx.size)
    args = dict(num_tokens_per_rank=per_rank.to(ctx.device), is_token_in_rank=in_rank.to(ctx.device),
                num_tokens_per_expert=per_expert.to(ctx.device), topk_idx=topk_idx.to(ctx.device),
                topk_weights=weights.to(ctx.device))
    worst = (NUM_TOKENS + ctx.size) * ctx.size
    recv_x, recv_topk, recv_weights, counts, handle, _ = buffer.dispatch(x.to(ctx.device), num_worst_tokens=worst,
                                                                         **args)
    everyone = ctx.gather((x, topk_idx, weights, in_rank))
    expected = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], [e[3] for e in everyone],
                            [e[1] for e in everyone], [e[2] for e in everyone])
    real = expected["recv_x"].size(0)
    assert recv_x.size(0) == worst and recv_topk.size(0) == worst and recv_weights.size(0) == worst
    assert counts == [], f"num_recv_tokens_per_expert_list must be empty with num_worst_tokens, got {counts}"
    assert_equal(recv_x[:real], expected["recv_x"], "recv_x (real rows)")
    assert_equal(recv_topk[:real], expected["recv_topk_idx"], "recv_topk_idx (real rows)")
    assert_equal(recv_topk[real:], torch.full((worst - real, NUM_TOPK), -1), "recv_topk_idx (padding)")
    assert_equal(recv_weights[real:], torch.zeros(worst - real, NUM_TOPK), "recv_topk_weights (padding)")
    # combine over the padded rows gives the same sums as over the real ones
    combined, _, _ = buffer.combine(recv_x, handle)
    sources = ctx.gather((cpu(recv_x[:real]), expected["src_rank"], expected["src_idx"]))
    sums = ref.combine(ctx.rank, x.size(0), [s[0] for s in sources], [(s[1], s[2]) for s in sources])
    assert_equal(combined, sums.to(torch.bfloat16), "combined_x after worst-case dispatch")
    # too small: every rank fails with the sizes in the message, and the buffer stays usable
    # (the CUDA backend's kernels detect it: it surfaces at check_errors(), since this path never
    # waits on the host)
    expect_error(epcomm.OutOfCapacityError, ("num_worst_tokens",),
                 lambda: (buffer.dispatch(x.to(ctx.device), num_worst_tokens=1, **args), buffer.check_errors()))
    again = buffer.dispatch(x.to(ctx.device), **args)
    assert_equal(again[0], expected["recv_x"], "recv_x after a failed call")
    buffer.destroy()


def check_routing_without_topk(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, _ = make_inputs(ctx, seed=8)
    _, _, _, in_rank = ref.layout(topk_idx, ctx.size, num_experts_for(ctx), ctx.size)
    recv_x, recv_topk, recv_weights, counts, handle, _ = buffer.dispatch(x.to(ctx.device),
                                                                         is_token_in_rank=in_rank.to(ctx.device))
    assert recv_topk is None and recv_weights is None
    assert isinstance(counts, list)
    everyone = ctx.gather((x, in_rank))
    expected = ref.dispatch(ctx.rank, num_experts_for(ctx), [e[0] for e in everyone], [e[1] for e in everyone])
    assert_equal(recv_x, expected["recv_x"], "recv_x (routing by is_token_in_rank)")
    assert_equal(handle.rank_prefix_matrix, expected["rank_prefix_matrix"], "rank_prefix_matrix")
    buffer.destroy()


def check_async_and_events(ctx: Any, allocate_on_comm_stream: bool) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, weights = make_inputs(ctx, seed=9)
    num_experts = num_experts_for(ctx)
    previous = epcomm.Buffer.capture()
    assert isinstance(previous, epcomm.EventOverlap) and previous.event is not None
    flags = dict(async_finish=True, allocate_on_comm_stream=allocate_on_comm_stream)
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
        topk_idx.to(ctx.device), num_experts, previous_event=previous, **flags)
    assert event.event is not None and event.extra_tensors, "async_finish must return an event holding the tensors"
    event.current_stream_wait()
    recv = buffer.dispatch(x.to(ctx.device), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=topk_idx.to(ctx.device),
                           topk_weights=weights.to(ctx.device), previous_event=event, **flags)
    with recv[5] as entered:  # leaving the block makes the current stream wait
        assert entered is recv[5]
    assert any(t is recv[0] for t in recv[5].extra_tensors), "the event must keep recv_x alive"
    combined, combined_weights, done = buffer.combine(recv[0], recv[4], topk_weights=recv[2],
                                                      previous_event=recv[5], **flags)
    done.current_stream_wait()
    if ctx.kind == "cuda":
        torch.cuda.synchronize()
    assert_equal(combined_weights, weights, "combined_topk_weights (async)")
    everyone = ctx.gather((x, cpu(in_rank)))
    expected = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], [e[1] for e in everyone])
    assert_equal(recv[0], expected["recv_x"], "recv_x (async)")
    # a synchronous call's EventOverlap is a valid previous_event too; its waits are no-ops
    sync_event = buffer.get_dispatch_layout(topk_idx.to(ctx.device), num_experts)[4]
    sync_event.current_stream_wait()
    buffer.get_dispatch_layout(topk_idx.to(ctx.device), num_experts, previous_event=sync_event)
    buffer.destroy()


def check_configs(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, weights = make_inputs(ctx, seed=10)
    num_experts = num_experts_for(ctx)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx.to(ctx.device), num_experts)
    config = epcomm.Config(4, 4, 64, 4, 32)
    recv = buffer.dispatch(x.to(ctx.device), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=topk_idx.to(ctx.device),
                           topk_weights=weights.to(ctx.device), config=config)
    combined, _, _ = buffer.combine(recv[0], recv[4], config=epcomm.Buffer.get_combine_config(ctx.size))
    assert combined.shape == x.shape
    expect_error(epcomm.InvalidArgumentError, ("num_sms", "3"),
                 lambda: buffer.dispatch(x.to(ctx.device), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                         num_tokens_per_expert=per_expert, topk_idx=topk_idx.to(ctx.device),
                                         config=epcomm.Config(num_sms=3)))
    buffer.destroy()


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks_per_node", ["all", "two"])
def test_get_dispatch_layout(world, ranks_per_node: str) -> None:
    rpn = world.size if ranks_per_node == "all" else 2
    world.run(check_layout, rpn)


@pytest.mark.parametrize("expert_alignment,bias_count,internode", [(1, 0, False), (4, 1, False), (1, 2, True)])
def test_dispatch_then_combine(world, expert_alignment: int, bias_count: int, internode: bool) -> None:
    world.run(check_dispatch_combine, expert_alignment, bias_count, internode)


@pytest.mark.parametrize("column_major_scales", [False, True], ids=["row_major", "column_major"])
def test_fp8_dispatch(world, column_major_scales: bool) -> None:
    world.run(check_fp8_dispatch, column_major_scales)


def test_cached_dispatch(world) -> None:
    world.run(check_cached_dispatch)


def test_num_worst_tokens(world) -> None:
    world.run(check_worst_tokens)


def test_routing_by_is_token_in_rank(world) -> None:
    world.run(check_routing_without_topk)


@pytest.mark.parametrize("allocate_on_comm_stream", [False, True])
def test_async_finish_and_events(world, allocate_on_comm_stream: bool) -> None:
    world.run(check_async_and_events, allocate_on_comm_stream)


def test_configs(world) -> None:
    world.run(check_configs)
