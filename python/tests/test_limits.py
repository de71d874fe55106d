"""Capability query (``Buffer.limits()`` / ``Buffer.backend_limits()``) and the errors of inputs that
used to be accepted though wrong: UE8M0-packed int32 FP8 scales, wrong scale column counts, combine
weights with another K than the dispatch's, K = 0, hidden = 0, timeout_s < 0 (SPEC §1, §5)."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import epcomm
import reference as ref
from _common import expect_error, normal_buffer

HIDDEN = 1024
LIMIT_KEYS = {"backend", "available", "normal_mode", "low_latency_mode", "normal_inter_node", "low_latency_inter_node",
              "max_ranks", "max_ranks_per_node", "max_topk", "row_alignment_bytes", "data_alignment_bytes",
              "max_num_sms", "max_local_experts", "x_dtypes", "scale_dtypes", "max_low_latency_topk",
              "low_latency_hidden_multiple", "max_low_latency_tokens_per_rank", "max_low_latency_experts",
              "use_logfmt"}


def test_backend_limits_without_a_buffer() -> None:
    cpu = epcomm.Buffer.backend_limits("cpu")
    assert set(cpu) == LIMIT_KEYS
    assert cpu["available"] and cpu["normal_mode"] and cpu["low_latency_mode"]
    assert cpu["x_dtypes"] == [torch.bfloat16, torch.float8_e4m3fn]
    assert cpu["scale_dtypes"] == [torch.float32, torch.int32]
    assert (cpu["max_topk"], cpu["max_low_latency_topk"], cpu["low_latency_hidden_multiple"]) == (32, 16, 128)
    assert cpu["use_logfmt"]  # docs/LOGFMT.md
    cuda = epcomm.Buffer.backend_limits("cuda")
    assert cuda["backend"] == "cuda" and set(cuda) == LIMIT_KEYS
    if cuda["available"]:
        assert not cuda["normal_inter_node"] and cuda["max_low_latency_tokens_per_rank"] < 2**31 - 1
    expect_error(epcomm.InvalidArgumentError, ("backend", "tpu"), lambda: epcomm.Buffer.backend_limits("tpu"))


def tagged_int32_scales(rank: int, num_tokens: int, columns: int, seed: int) -> torch.Tensor:
    """[T, S] int32 words naming (rank, token, column) over a random salt every rank can recompute."""
    salt = int(torch.randint(0, 1 << 12, (1,), generator=ref.generator(seed, 0)))
    t = torch.arange(num_tokens, dtype=torch.int32).unsqueeze(1)
    s = torch.arange(columns, dtype=torch.int32).unsqueeze(0)
    return (salt << 19) | (rank << 15) | (t << 4) | s


def check_limits_and_errors(ctx: Any) -> None:
    invalid = epcomm.InvalidArgumentError
    for bad in (-1.0, math.nan, math.inf):
        expect_error(invalid, ("timeout_s",), lambda: normal_buffer(ctx, HIDDEN, timeout_s=bad))
    buffer = normal_buffer(ctx, HIDDEN, poison=False)
    limits = buffer.limits()
    static = epcomm.Buffer.backend_limits(ctx.kind)
    assert set(limits) == LIMIT_KEYS and limits["backend"] == ctx.kind
    assert {k: v for k, v in limits.items() if k != "max_num_sms"} == {k: v for k, v in static.items()
                                                                       if k != "max_num_sms"}
    assert 0 < limits["max_num_sms"] <= static["max_num_sms"]

    seed = ctx.gather(int(torch.randint(0, 1 << 30, (1,))))[0]  # one seed: every rank can predict the tags
    num_tokens, num_experts = 6 + ctx.rank, 4 * ctx.size
    x = ref.tokens(ctx.rank, num_tokens, HIDDEN, seed).to(torch.float8_e4m3fn).to(ctx.device)
    topk_idx, weights = ref.routing(ctx.rank, num_tokens, 2, num_experts, seed)
    topk_idx, weights = topk_idx.to(ctx.device), weights.to(ctx.device)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    routing = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                   topk_idx=topk_idx, topk_weights=weights)

    # UE8M0-packed int32 scales [T, hidden / 512] move unchanged, keeping dtype and majorness
    for column_major in (False, True):
        scales = tagged_int32_scales(ctx.rank, num_tokens, HIDDEN // 512, seed)
        if column_major:
            scales = scales.t().contiguous().t()
        (recv_x, recv_scales), recv_topk, recv_weights, _, handle, _ = buffer.dispatch((x, scales.to(ctx.device)),
                                                                                     **routing)
        assert recv_scales.dtype == torch.int32 and recv_scales.shape == (recv_x.size(0), HIDDEN // 512)
        assert (recv_scales.stride(1) != 1) == column_major or recv_x.size(0) <= 1
        prefix = handle.rank_prefix_matrix[:, ctx.rank].cpu().tolist()
        sources = torch.repeat_interleave(torch.arange(ctx.size), torch.tensor([prefix[0]] + [
            prefix[i] - prefix[i - 1] for i in range(1, ctx.size)]))
        for row, (source, token) in enumerate(zip(sources.tolist(), handle.recv_src_idx.cpu().tolist())):
            expected = tagged_int32_scales(source, token + 1, HIDDEN // 512, seed)[token]
            assert torch.equal(recv_scales[row].cpu(), expected), f"row {row} from rank {source}"

    # other column counts are named errors
    for columns in (1, 7):
        expect_error(invalid, ("x_scales", "hidden / 128 = 8"),
                     lambda: buffer.dispatch((x, torch.ones(num_tokens, columns, device=ctx.device)), **routing))
    expect_error(invalid, ("x_scales", "hidden / 512 = 2"),
                 lambda: buffer.dispatch((x, torch.ones(num_tokens, 8, dtype=torch.int32, device=ctx.device)),
                                         **routing))

    # combine weights with another K than the dispatch's
    bf16 = ref.tokens(ctx.rank, num_tokens, HIDDEN, seed).to(ctx.device)
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(bf16, **routing)
    wide = torch.cat([recv_weights, recv_weights], dim=1)
    expect_error(invalid, ("topk_weights", "K = 2", "got K = 4"),
                 lambda: buffer.combine(recv_x, handle, topk_weights=wide))
    combined, combined_weights, _ = buffer.combine(recv_x, handle, topk_weights=recv_weights)
    assert combined_weights.shape == (num_tokens, 2)

    # K = 0 and hidden = 0 say so
    expect_error(invalid, ("topk_idx", "K = 0"),
                 lambda: buffer.get_dispatch_layout(topk_idx[:, :0], num_experts))
    expect_error(invalid, ("x", "hidden = 0"), lambda: buffer.dispatch(bf16[:, :0], **routing))
    buffer.destroy()


def test_limits_and_errors(world) -> None:
    world.run(check_limits_and_errors)
