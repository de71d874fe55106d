"""What only the CUDA backend has: the communication stream and its events, tensor lifetimes across
streams, and CUDA-graph capture of the capturable paths (SPEC §3.2, §3.4, §4)."""
from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, cpu, low_latency_buffer, normal_buffer

pytestmark = pytest.mark.worlds("cuda2", "cuda4", "cuda8")

HIDDEN = 1024
NUM_TOKENS = 64
NUM_TOPK = 4


def make_inputs(ctx: Any, seed: int, num_tokens: int = NUM_TOKENS):
    x = ref.tokens(ctx.rank, num_tokens, HIDDEN, seed)
    topk_idx, weights = ref.routing(ctx.rank, num_tokens, NUM_TOPK, 4 * ctx.size, seed)
    return x, topk_idx, weights


def expected_dispatch(ctx: Any, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    in_rank = ref.layout(topk_idx, ctx.size, 4 * ctx.size, ctx.size)[3]
    everyone = ctx.gather((x, in_rank))
    return ref.dispatch(ctx.rank, 4 * ctx.size, [e[0] for e in everyone], [e[1] for e in everyone])["recv_x"]


def check_comm_stream_and_lifetimes(ctx: Any) -> None:
    # Not poisoned: outputs are allocated for the side stream after `previous` was captured, so a
    # poison fill there would race with the kernels, which (rightly) wait only for `previous`.
    buffer = normal_buffer(ctx, HIDDEN, poison=False)
    stream = buffer.get_comm_stream()
    assert isinstance(stream, torch.cuda.Stream) and stream.device == ctx.device
    assert stream.cuda_stream != torch.cuda.current_stream().cuda_stream
    x, topk_idx, weights = make_inputs(ctx, seed=1)
    expected = expected_dispatch(ctx, x, topk_idx)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the caller works on another stream; previous_event orders us after it
        d_x = x.to(ctx.device)
        d_topk = topk_idx.to(ctx.device)
        torch.cuda._sleep(10_000_000)  # long work before the inputs are final
        d_x.mul_(1)
        previous = epcomm.Buffer.capture()
        layout = buffer.get_dispatch_layout(d_topk, 4 * ctx.size, previous_event=previous, async_finish=True)
        recv = buffer.dispatch(d_x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                               num_tokens_per_expert=layout[2], topk_idx=d_topk, previous_event=layout[4],
                               async_finish=True, allocate_on_comm_stream=True)
        event = recv[5]
        del d_x, d_topk, layout  # the call holds them until the work is done
        gc.collect()
        scratch = [torch.full((NUM_TOKENS, HIDDEN), 7.0, dtype=torch.bfloat16, device=ctx.device) for _ in range(4)]
        event.current_stream_wait()
        recv_x = recv[0].clone()
    torch.cuda.synchronize()
    assert_equal(recv_x, expected, "recv_x after async dispatch with dropped inputs")
    del scratch
    buffer.destroy()


def check_outputs_outlive_destroy(ctx: Any) -> None:
    # Outputs of an async call are record_stream-ed on the comm stream; freeing them after destroy()
    # makes torch's allocator record an event on that stream, so it must still exist then.
    buffer = normal_buffer(ctx, HIDDEN)
    x, topk_idx, _ = make_inputs(ctx, seed=9)
    expected = expected_dispatch(ctx, x, topk_idx)
    d_topk = topk_idx.to(ctx.device)
    layout = buffer.get_dispatch_layout(d_topk, 4 * ctx.size)
    recv = buffer.dispatch(x.to(ctx.device), num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                           num_tokens_per_expert=layout[2], topk_idx=d_topk, async_finish=True,
                           allocate_on_comm_stream=True)
    recv[5].current_stream_wait()
    recv_x = recv[0].clone()
    stream = buffer.get_comm_stream()
    buffer.destroy()
    del recv, layout
    gc.collect()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):  # the stream stays usable after destroy()
        torch.ones(8, device=ctx.device).mul_(2)
    torch.cuda.synchronize()
    assert_equal(recv_x, expected, "recv_x of an async dispatch whose outputs were freed after destroy()")


def check_graph_normal(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    num_experts = 4 * ctx.size
    x, topk_idx, weights = make_inputs(ctx, seed=2)
    static_x = x.to(ctx.device)
    static_topk, static_weights = topk_idx.to(ctx.device), weights.to(ctx.device)
    worst = NUM_TOKENS * ctx.size

    def step():
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(static_topk, num_experts)
        recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(
            static_x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=static_topk, topk_weights=static_weights,
            num_worst_tokens=worst)
        combined, combined_weights, _ = buffer.combine(recv_x, handle, topk_weights=recv_weights)
        return recv_x, combined, combined_weights, in_rank

    step()  # warm-up outside the graph
    torch.cuda.synchronize()
    buffer.check_errors()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, combined, combined_weights, in_rank = step()
    for seed in (3, 4):
        new_x = ref.tokens(ctx.rank, NUM_TOKENS, HIDDEN, seed)
        static_x.copy_(new_x.to(ctx.device))
        graph.replay()
        torch.cuda.synchronize()
        buffer.check_errors()
        expected = expected_dispatch(ctx, new_x, topk_idx)
        assert_equal(recv_x[:expected.size(0)], expected, f"recv_x (graph replay, seed {seed})")
        times = cpu(in_rank).sum(dim=1, keepdim=True).float()
        assert_equal(combined_weights, weights, "combined_topk_weights (graph replay)")
        torch.testing.assert_close(cpu(combined).float(), new_x.float() * times, rtol=1e-2, atol=1e-2)
    del graph
    buffer.destroy()


def check_graph_low_latency(ctx: Any) -> None:
    num_experts = 2 * ctx.size
    max_tokens = 32
    buffer = low_latency_buffer(ctx, max_tokens, HIDDEN, num_experts)
    x = ref.tokens(ctx.rank, max_tokens, HIDDEN, seed=5)
    topk_idx, weights = ref.routing(ctx.rank, max_tokens, 2, num_experts, seed=5)
    static_x, static_topk, static_weights = x.to(ctx.device), topk_idx.to(ctx.device), weights.to(ctx.device)

    def step():
        (values, scales), recv_count, handle, _, _ = buffer.low_latency_dispatch(static_x, static_topk, max_tokens,
                                                                                 num_experts, use_fp8=True)
        expert_out = (values.float() * scales.repeat_interleave(128, dim=-1)).to(torch.bfloat16)
        combined, _, _ = buffer.low_latency_combine(expert_out, static_topk, static_weights, handle)
        return combined, recv_count

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        combined, recv_count = step()
    for seed in (6, 7):
        new_x = ref.tokens(ctx.rank, max_tokens, HIDDEN, seed)
        static_x.copy_(new_x.to(ctx.device))
        graph.replay()
        torch.cuda.synchronize()
        # experts are the identity (dequantised FP8): the result is x times its total weight
        expected = new_x.float() * weights.sum(dim=1, keepdim=True)
        torch.testing.assert_close(cpu(combined).float(), expected, rtol=0.1, atol=0.1)
    del graph
    buffer.destroy()


def check_hook_leaves_stream_free(ctx: Any) -> None:
    num_experts = 2 * ctx.size
    max_tokens = 32
    buffer = low_latency_buffer(ctx, max_tokens, HIDDEN, num_experts)
    x = ref.tokens(ctx.rank, max_tokens, HIDDEN, seed=8)
    topk_idx, weights = ref.routing(ctx.rank, max_tokens, 2, num_experts, seed=8)
    received, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x.to(ctx.device), topk_idx.to(ctx.device), max_tokens, num_experts, use_fp8=False, return_recv_hook=True)
    overlap = torch.randn(2048, 2048, device=ctx.device) @ torch.randn(2048, 2048, device=ctx.device)  # overlapped work
    hook()
    torch.cuda.synchronize()
    rows = ref.low_latency_rows(ctx.rank, num_experts, ctx.gather(topk_idx))
    everyone = ctx.gather(x)
    for l, expert_rows in enumerate(rows):
        expected = torch.stack([everyone[s][t] for s, t in expert_rows]) if expert_rows else x[:0]
        assert_equal(received[l, :len(expert_rows)], expected, f"recv_x of local expert {l} after the hook")
    del overlap
    buffer.destroy()


def test_comm_stream_and_tensor_lifetimes(world) -> None:
    world.run(check_comm_stream_and_lifetimes)


def test_outputs_freed_after_destroy(world) -> None:
    world.run(check_outputs_outlive_destroy)


def test_cuda_graph_normal_mode(world) -> None:
    world.run(check_graph_normal)


def test_cuda_graph_low_latency(world) -> None:
    world.run(check_graph_low_latency)


def test_recv_hook(world) -> None:
    world.run(check_hook_leaves_stream_free)
