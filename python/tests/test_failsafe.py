"""The fail-safe parts of SPEC §5 visible from Python: the BufferFailed class, handles bound to their
Buffer, a bad input on one rank raised by every rank (CPU backend) with the next call still exact."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, cpu, expect_error, normal_buffer

HIDDEN = 256
NUM_TOPK = 4


def test_buffer_failed_is_an_epcomm_error() -> None:
    assert issubclass(epcomm.BufferFailed, epcomm.Error)
    assert issubclass(epcomm.BufferFailed, RuntimeError)
    assert not issubclass(epcomm.BufferFailed, epcomm.InvalidArgumentError)
    from epcomm import _errors
    assert _errors.BufferFailed is epcomm.BufferFailed
    assert "BufferFailed" in epcomm.__all__


def _inputs(ctx: Any, seed: int):
    num_experts = 4 * ctx.size
    x = ref.tokens(ctx.rank, 12 + ctx.rank, HIDDEN, seed)
    topk_idx, weights = ref.routing(ctx.rank, 12 + ctx.rank, NUM_TOPK, num_experts, seed)
    return x.to(ctx.device), topk_idx.to(ctx.device), weights.to(ctx.device), num_experts


def _dispatch(buffer: epcomm.Buffer, x: Any, topk_idx: Any, weights: Any, num_experts: int,
              layout_topk: Any = None):
    """A fresh dispatch with the layout of ``layout_topk`` (default: ``topk_idx``)."""
    per_rank, _, per_expert, in_rank = buffer.get_dispatch_layout(
        topk_idx if layout_topk is None else layout_topk, num_experts)[:4]
    return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights)


def check_stale_handle(ctx: Any) -> None:
    x, topk_idx, weights, num_experts = _inputs(ctx, seed=31)
    old = normal_buffer(ctx, HIDDEN)
    recv_x, _, _, _, handle, _ = _dispatch(old, x, topk_idx, weights, num_experts)
    old.destroy()
    new = normal_buffer(ctx, HIDDEN)
    expect_error(epcomm.InvalidArgumentError, ("combine", "handle", "another Buffer"),
                 lambda: new.combine(recv_x, handle))
    new.destroy()


def check_bad_input_on_one_rank(ctx: Any) -> None:
    x, topk_idx, weights, num_experts = _inputs(ctx, seed=32)
    buffer = normal_buffer(ctx, HIDDEN)
    bad = topk_idx.clone()
    if ctx.rank == 1:
        bad[3, 1] = num_experts + 7
    words = ("topk_idx", str(num_experts + 7)) if ctx.rank == 1 else ("rank 1 rejected its inputs", "topk_idx")
    # The layout comes from the good indices (get_dispatch_layout is local and would raise on rank 1
    # alone); the dispatch's own check of topk_idx finds the bad value and every rank raises.
    expect_error(epcomm.InvalidArgumentError, words,
                 lambda: _dispatch(buffer, x, bad, weights, num_experts, layout_topk=topk_idx))
    # The call was matched on every rank: the Buffer is usable and the next call exact.
    recv_x = _dispatch(buffer, x, topk_idx, weights, num_experts)[0]
    everyone = ctx.gather((cpu(x), cpu(topk_idx)))
    in_rank = [ref.layout(t, ctx.size, num_experts, ctx.size)[3] for _, t in everyone]
    expected = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], in_rank)
    assert_equal(recv_x, expected["recv_x"], "recv_x after a rejected call")
    buffer.destroy()


def test_stale_handle_is_rejected(world) -> None:
    world.run(check_stale_handle)


@pytest.mark.worlds("cpu2", "cpu4")
def test_bad_input_on_one_rank_is_raised_by_every_rank(world) -> None:
    world.run(check_bad_input_on_one_rank)
