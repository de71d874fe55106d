"""Low-latency mode through the Python surface (SPEC §4): dispatch in every format, combine (out=,
zero-copy), receive hooks, async events, statistics, buffer cleaning, rank masks."""
from __future__ import annotations

from typing import Any, List, Tuple

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, cpu, expect_error, low_latency_buffer

HIDDEN = 512  # a multiple of 512, so that UE8M0 packing applies
MAX_TOKENS = 16
NUM_TOPK = 3


def num_experts_for(ctx: Any) -> int:
    return 2 * ctx.size


def make_inputs(ctx: Any, seed: int, num_tokens: int = 0):
    num_tokens = num_tokens or MAX_TOKENS - ctx.rank  # ranks differ in T, rank 0 is full
    x = ref.tokens(ctx.rank, num_tokens, HIDDEN, seed)
    topk_idx, weights = ref.routing(ctx.rank, num_tokens, NUM_TOPK, num_experts_for(ctx), seed)
    return x, ref.duplicate_slots(topk_idx), weights


def expected_rows(ctx: Any, topk_idx: torch.Tensor) -> List[List[Tuple[int, int]]]:
    return ref.low_latency_rows(ctx.rank, num_experts_for(ctx), ctx.gather(topk_idx))


def check_handle(ctx: Any, handle: Any, rows: List[List[Tuple[int, int]]], recv_count: torch.Tensor) -> None:
    local = num_experts_for(ctx) // ctx.size
    assert isinstance(handle, tuple) and len(handle) == 5
    src_info, layout_range, max_tokens, hidden, num_experts = handle
    assert (max_tokens, hidden, num_experts) == (MAX_TOKENS, HIDDEN, num_experts_for(ctx))
    assert src_info.shape == (local, ctx.size * MAX_TOKENS) and src_info.dtype == torch.int32
    assert layout_range.shape == (local, ctx.size) and layout_range.dtype == torch.int64
    assert_equal(recv_count, torch.tensor([len(r) for r in rows], dtype=torch.int32), "recv_count")
    src_info, layout_range = cpu(src_info), cpu(layout_range)
    for l, expert_rows in enumerate(rows):
        assert_equal(src_info[l, :len(expert_rows)], torch.tensor([t for _, t in expert_rows], dtype=torch.int32),
                     f"src_info of local expert {l}")
        for source in range(ctx.size):
            begins = [i for i, (s, _) in enumerate(expert_rows) if s == source]
            packed = int(layout_range[l, source])
            assert packed & 0xFFFFFFFF == len(begins), f"layout_range[{l}, {source}] count"
            if begins:
                assert packed >> 32 == begins[0], f"layout_range[{l}, {source}] begin"


def expected_received(ctx: Any, x: torch.Tensor, rows: List[List[Tuple[int, int]]]) -> List[torch.Tensor]:
    everyone = ctx.gather(x)
    return [torch.stack([everyone[s][t] for s, t in expert_rows]) if expert_rows else x[:0] for expert_rows in rows]


def check_dispatch(ctx: Any, use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> None:
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts_for(ctx))
    x, topk_idx, _ = make_inputs(ctx, seed=1)
    received, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x.to(ctx.device), topk_idx.to(ctx.device), MAX_TOKENS, num_experts_for(ctx), use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=use_ue8m0)
    assert event.event is None and hook is None
    rows = expected_rows(ctx, topk_idx)
    check_handle(ctx, handle, rows, recv_count)
    expected = expected_received(ctx, x, rows)
    local, slots = num_experts_for(ctx) // ctx.size, ctx.size * MAX_TOKENS
    if not use_fp8:
        assert received.shape == (local, slots, HIDDEN) and received.dtype == torch.bfloat16
        for l, rows_l in enumerate(expected):
            assert_equal(received[l, :rows_l.size(0)], rows_l, f"recv_x of local expert {l}")
        buffer.destroy()
        return
    values, scales = received
    assert values.shape == (local, slots, HIDDEN) and values.dtype == torch.float8_e4m3fn
    groups = HIDDEN // 512 if use_ue8m0 else HIDDEN // 128
    assert scales.shape == (local, slots, groups) and scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
    assert scales.stride() == (slots * groups, 1, slots), f"scales must be column-major, strides {scales.stride()}"
    for l, rows_l in enumerate(expected):
        count = rows_l.size(0)
        fp8, float_scales = ref.fp8_cast(rows_l, round_scale)
        assert_equal(values[l, :count], fp8, f"fp8 recv_x of local expert {l}")
        want_scales = ref.ue8m0_pack(float_scales) if use_ue8m0 else float_scales
        assert_equal(scales[l, :count], want_scales, f"scales of local expert {l}")
    buffer.destroy()


def check_combine(ctx: Any, mode: str) -> None:
    """mode: 'plain', 'out', 'zero_copy', 'hook' or 'async'."""
    num_experts = num_experts_for(ctx)
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts)
    x, topk_idx, weights = make_inputs(ctx, seed=2)
    d_topk, d_weights = topk_idx.to(ctx.device), weights.to(ctx.device)
    hook_flags = dict(return_recv_hook=mode == "hook", async_finish=mode == "async")
    received, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x.to(ctx.device), d_topk, MAX_TOKENS, num_experts, use_fp8=False, **hook_flags)
    if mode == "hook":
        assert callable(hook)
        hook()
        expect_error(epcomm.InvalidArgumentError, ("hook",), hook)  # a hook runs once
    elif mode == "async":
        assert event.event is not None and event.extra_tensors
        event.current_stream_wait()
    # the "experts": exact dyadic values, different on every rank and row
    expert_out = ref.dyadic_tokens(ctx.rank, received.shape, seed=3).to(ctx.device)
    out = None
    if mode == "zero_copy":
        target = buffer.get_next_low_latency_combine_buffer(handle)
        assert target.shape == received.shape and target.dtype == torch.bfloat16
        target.copy_(expert_out)
    if mode == "out":
        out = torch.full((x.size(0), HIDDEN), float("nan"), dtype=torch.bfloat16, device=ctx.device)
    combined, event, hook = buffer.low_latency_combine(expert_out, d_topk, d_weights, handle,
                                                       zero_copy=mode == "zero_copy", out=out, **hook_flags)
    if mode == "hook":
        hook()
    elif mode == "async":
        with event:
            pass
    if mode == "out":
        assert combined is out
    rows = [ref.low_latency_rows(r, num_experts, ctx.gather(topk_idx)) for r in range(ctx.size)]
    expected = ref.low_latency_combine(ctx.rank, num_experts, MAX_TOKENS, topk_idx, weights,
                                       ctx.gather(cpu(expert_out)), rows)
    assert_equal(combined, expected.to(torch.bfloat16), f"combined_x ({mode})")
    buffer.destroy()


def check_statistics(ctx: Any) -> None:
    num_experts = num_experts_for(ctx)
    local = num_experts // ctx.size
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts)
    x, topk_idx, weights = make_inputs(ctx, seed=4)
    recv_stats = torch.full((local,), 5, dtype=torch.int32, device=ctx.device)
    dispatch_wait = torch.zeros(ctx.size, dtype=torch.int64, device=ctx.device)
    combine_wait = torch.zeros(ctx.size, dtype=torch.int64, device=ctx.device)
    counts = torch.zeros(local, dtype=torch.int32)
    for round_ in range(2):
        received, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x.to(ctx.device), topk_idx.to(ctx.device), MAX_TOKENS, num_experts, use_fp8=False,
            cumulative_local_expert_recv_stats=recv_stats, dispatch_wait_recv_cost_stats=dispatch_wait)
        counts += recv_count.cpu()
        buffer.low_latency_combine(received, topk_idx.to(ctx.device), weights.to(ctx.device), handle,
                                   combine_wait_recv_cost_stats=combine_wait)
    assert_equal(recv_stats, counts + 5, "cumulative_local_expert_recv_stats")
    assert bool((dispatch_wait.cpu() >= 0).all()) and bool((combine_wait.cpu() >= 0).all())
    buffer.destroy()


def check_clean_and_reuse(ctx: Any) -> None:
    num_experts = num_experts_for(ctx)
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts)
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, num_experts)
    results = []
    for seed in (5, 6, 7):  # three calls: results of the last two stay valid
        x, topk_idx, _ = make_inputs(ctx, seed=seed)
        received, recv_count, handle, _, _ = buffer.low_latency_dispatch(x.to(ctx.device), topk_idx.to(ctx.device),
                                                                         MAX_TOKENS, num_experts, use_fp8=False)
        results.append((x, topk_idx, received, recv_count))
    for x, topk_idx, received, recv_count in results[1:]:
        rows = expected_rows(ctx, topk_idx)
        for l, rows_l in enumerate(expected_received(ctx, x, rows)):
            assert_equal(received[l, :rows_l.size(0)], rows_l, f"recv_x of local expert {l} (reused buffer)")
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, num_experts)
    buffer.destroy()


def check_bad_inputs(ctx: Any) -> None:
    num_experts = num_experts_for(ctx)
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts)
    x, topk_idx, weights = make_inputs(ctx, seed=8)
    x, topk_idx, weights = x.to(ctx.device), topk_idx.to(ctx.device), weights.to(ctx.device)
    invalid = epcomm.InvalidArgumentError
    expect_error(invalid, ("num_max_dispatch_tokens_per_rank",),
                 lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS // 4, num_experts))
    expect_error(invalid, ("async_finish", "return_recv_hook"),
                 lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, async_finish=True,
                                                     return_recv_hook=True))
    expect_error(invalid, ("use_ue8m0",),
                 lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_ue8m0=True))
    expect_error(invalid, ("x", "hidden"),
                 lambda: buffer.low_latency_dispatch(x[:, :100].contiguous(), topk_idx, MAX_TOKENS, num_experts))
    expect_error(epcomm.OutOfCapacityError, ("num_rdma_bytes",),
                 lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS * 4, num_experts))
    received, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
    if ctx.device.type == "cuda":  # LogFMT is built on the CPU backend only so far
        expect_error(epcomm.UnsupportedError, ("use_logfmt", "CUDA"),
                     lambda: buffer.low_latency_combine(received, topk_idx, weights, handle, use_logfmt=True))
    expect_error(invalid, ("handle",), lambda: buffer.low_latency_combine(received, topk_idx, weights, handle[:3]))
    expect_error(invalid, ("x",), lambda: buffer.low_latency_combine(received[:, :1], topk_idx, weights, handle))
    expect_error(invalid, ("out",), lambda: buffer.low_latency_combine(received, topk_idx, weights, handle,
                                                                        out=torch.empty(1, HIDDEN, device=ctx.device)))
    combined, _, _ = buffer.low_latency_combine(received, topk_idx, weights, handle)  # still usable
    assert combined.shape == x.shape
    normal_only = epcomm.Buffer(ctx.group, num_nvl_bytes=1 << 20)
    expect_error(invalid, ("low_latency_mode",),
                 lambda: normal_only.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts))
    expect_error(invalid, ("enable_shrink",), lambda: buffer.low_latency_update_mask_buffer(0, True))
    normal_only.destroy()
    buffer.destroy()


def check_masks(ctx: Any) -> None:
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts_for(ctx), enable_shrink=True)
    status = torch.full((ctx.size,), 7, dtype=torch.int32, device=ctx.device)
    buffer.low_latency_query_mask_buffer(status)
    assert_equal(status, torch.zeros(ctx.size, dtype=torch.int32), "mask after construction")
    buffer.low_latency_update_mask_buffer(ctx.size - 1, True)
    buffer.low_latency_query_mask_buffer(status)
    assert int(status[ctx.size - 1]) == 1
    buffer.low_latency_update_mask_buffer(ctx.size - 1, False)
    buffer.low_latency_query_mask_buffer(status)
    assert int(status[ctx.size - 1]) == 0
    buffer.low_latency_update_mask_buffer(0, mask=True)
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    assert_equal(status, torch.zeros(ctx.size, dtype=torch.int32), "mask after clean")
    expect_error(epcomm.InvalidArgumentError, ("rank",), lambda: buffer.low_latency_update_mask_buffer(ctx.size, True))
    expect_error(epcomm.InvalidArgumentError, ("mask_status",),
                 lambda: buffer.low_latency_query_mask_buffer(torch.zeros(ctx.size + 1, dtype=torch.int32)))
    buffer.destroy()


def logfmt_round_trip(x: torch.Tensor) -> torch.Tensor:
    """bf16 [..., hidden]: what LogFMT delivers for x, written from docs/LOGFMT.md with torch ops
    (independent of src/core/logfmt.hpp)."""
    bits = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    bits = bits.reshape(*x.shape[:-1], x.size(-1) // 128, 128)
    sign, magnitude = bits & 0x8000, bits & 0x7FFF
    finite_nonzero = (magnitude > 0) & (magnitude < 0x7F80)
    top = torch.where(finite_nonzero, magnitude, 0).amax(-1, keepdim=True)
    smallest = torch.where(finite_nonzero, magnitude, 0x7FFF).amin(-1, keepdim=True)
    shift = torch.full_like(top, 3)
    for s in (2, 1, 0):  # the finest step whose 510 steps reach the smallest value
        half = (1 << (s - 1)) if s else 0
        shift = torch.where((top - smallest + half) >> s <= 510, s, shift)
    half = torch.where(shift > 0, 1 << (shift - 1).clamp(min=0), 0)
    steps = (top - magnitude + half) >> shift
    level = top - (steps << shift)
    zero = (magnitude == 0) | (steps > 510) | (level <= 0)
    out = torch.where(zero, 0, sign | level)
    out = torch.where(magnitude >= 0x7F80, 0x7FC0, out)
    out = torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16)
    return out.reshape(x.shape).view(torch.bfloat16)


def calc_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


def check_logfmt(ctx: Any) -> None:
    """use_logfmt=True (SPEC §4.2): bit-exactly the sum of the rows as docs/LOGFMT.md decodes them,
    and within calc_diff 1e-3 of the exact combine."""
    num_experts = num_experts_for(ctx)
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts)
    x, topk_idx, weights = make_inputs(ctx, seed=12)
    d_topk, d_weights = topk_idx.to(ctx.device), weights.to(ctx.device)
    received, _, handle, _, _ = buffer.low_latency_dispatch(x.to(ctx.device), d_topk, MAX_TOKENS, num_experts,
                                                            use_fp8=False)
    # bf16 multiples of 1/256 in [-4, 4] (products with 1/8-step weights and sums of 3 stay exact in
    # float32, so the sum has one answer whatever the order) with one 2^-10 per block: the span of
    # 12 octaves makes LogFMT drop two of the 7 mantissa bits, so the result differs from the exact one
    steps = torch.randint(-1024, 1025, tuple(received.shape), generator=ref.generator(13, ctx.rank))
    expert_out = (steps.float() / 256).to(torch.bfloat16)
    expert_out[..., ::128] = 2.0 ** -10
    expert_out = expert_out.to(ctx.device)
    combined, _, _ = buffer.low_latency_combine(expert_out, d_topk, d_weights, handle, use_logfmt=True)
    again, _, _ = buffer.low_latency_combine(expert_out, d_topk, d_weights, handle, use_logfmt=True)
    assert_equal(again, combined, "use_logfmt combine repeated")
    rows = [ref.low_latency_rows(r, num_experts, ctx.gather(topk_idx)) for r in range(ctx.size)]
    all_out = ctx.gather(cpu(expert_out))
    exact = ref.low_latency_combine(ctx.rank, num_experts, MAX_TOKENS, topk_idx, weights, all_out, rows)
    delivered = [logfmt_round_trip(out) for out in all_out]
    expected = ref.low_latency_combine(ctx.rank, num_experts, MAX_TOKENS, topk_idx, weights, delivered, rows)
    assert_equal(combined, expected.to(torch.bfloat16), "combined_x (use_logfmt)")
    assert calc_diff(cpu(combined).float(), exact) < 1e-3
    assert not torch.equal(cpu(combined), exact.to(torch.bfloat16)), "LogFMT is lossy here: did it run?"
    buffer.destroy()


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_fp8,round_scale,use_ue8m0", [(False, False, False), (True, False, False),
                                                           (True, True, False), (True, True, True)],
                         ids=["bf16", "fp8", "fp8_round_scale", "fp8_ue8m0"])
def test_low_latency_dispatch(world, use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> None:
    world.run(check_dispatch, use_fp8, round_scale, use_ue8m0)


@pytest.mark.parametrize("mode", ["plain", "out", "zero_copy", "hook", "async"])
def test_low_latency_combine(world, mode: str) -> None:
    world.run(check_combine, mode)


def test_low_latency_logfmt(world) -> None:
    if world.kind == "cuda":
        pytest.skip("use_logfmt is built on the CPU backend only so far")
    world.run(check_logfmt)


def test_low_latency_statistics(world) -> None:
    world.run(check_statistics)


def test_low_latency_clean_and_reuse(world) -> None:
    world.run(check_clean_and_reuse)


def test_low_latency_bad_inputs(world) -> None:
    world.run(check_bad_inputs)


def test_low_latency_masks(world) -> None:
    world.run(check_masks)
