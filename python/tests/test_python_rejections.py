"""Errors the Python layer finds itself, on one rank only, are raised by every rank of that call (SPEC §5,
issue 11): a tensor ``describe()`` rejects, an integer out of the C++ range, a DeepEP fork argument, a
wrong handle, a missing argument, an unknown keyword. The peers raise at once (the Buffers wait up to 30 s,
so a regression shows as a slow test), the Buffer stays usable and the next call is exact."""
from __future__ import annotations

import time
from typing import Any, Callable, Tuple

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, cpu, expect_error, low_latency_buffer, normal_buffer

HIDDEN = 256
NUM_TOPK = 3
MAX_TOKENS = 8
TIMEOUT_S = 30.0
#: Far below TIMEOUT_S: what a rejection told in the call's exchange takes, with room for a slow machine.
QUICK_S = 5.0


def expect_raised_by_every_rank(ctx: Any, bad_rank: int, bad: Callable[[], Any], good: Callable[[], Any],
                                own_error: type, words: Tuple[str, ...]) -> None:
    """``bad_rank`` runs ``bad`` and raises ``own_error`` (its Python-side error) with ``words``; the other
    ranks run ``good`` (the same call, valid) and raise the epcomm class of that error naming ``bad_rank``."""
    start = time.monotonic()
    if ctx.rank == bad_rank:
        expect_error(own_error, words, bad)
    else:
        peer_error = own_error if issubclass(own_error, epcomm.Error) else epcomm.InvalidArgumentError
        expect_error(peer_error, (f"rank {bad_rank} rejected its inputs of this call",) + words, good)
    elapsed = time.monotonic() - start
    assert elapsed < QUICK_S, f"the call took {elapsed:.1f} s: its peers waited for a timeout"


# ---- normal mode --------------------------------------------------------------------------------------


def _normal_inputs(ctx: Any, seed: int):
    num_experts = 2 * ctx.size
    num_tokens = 10 + ctx.rank
    x = ref.tokens(ctx.rank, num_tokens, HIDDEN, seed)
    topk_idx, weights = ref.routing(ctx.rank, num_tokens, NUM_TOPK, num_experts, seed)
    return x, topk_idx, weights, num_experts


def _fresh_dispatch(buffer: epcomm.Buffer, x: Any, topk_idx: Any, weights: Any, num_experts: int, **overrides: Any):
    per_rank, _, per_expert, in_rank = buffer.get_dispatch_layout(topk_idx, num_experts)[:4]
    arguments = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=topk_idx, topk_weights=weights)
    arguments.update(overrides)
    return buffer.dispatch(x, **arguments)


def _checked_round_trip(ctx: Any, buffer: epcomm.Buffer, seed: int) -> None:
    """A fresh dispatch and a combine of what it received, both checked against the reference."""
    x, topk_idx, weights, num_experts = _normal_inputs(ctx, seed)
    recv_x, _, _, _, handle, _ = _fresh_dispatch(buffer, x, topk_idx, weights, num_experts)
    everyone = ctx.gather((x, topk_idx))
    in_rank = [ref.layout(t, ctx.size, num_experts, ctx.size)[3] for _, t in everyone]
    expected = ref.dispatch(ctx.rank, num_experts, [e[0] for e in everyone], in_rank)
    assert_equal(recv_x, expected["recv_x"], f"recv_x of the call after a rejection (seed {seed})")
    combined = buffer.combine(recv_x, handle)[0]
    contributions = ctx.gather(cpu(recv_x))
    sources = ctx.gather((expected["src_rank"], expected["src_idx"]))
    want = ref.combine(ctx.rank, x.size(0), contributions, sources).to(torch.bfloat16)
    assert_equal(combined, want, f"combined_x of the call after a rejection (seed {seed})")


def check_normal_mode_rejections(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN, timeout_s=TIMEOUT_S)
    last = ctx.size - 1
    x, topk_idx, weights, num_experts = _normal_inputs(ctx, seed=41)
    fresh = lambda **overrides: _fresh_dispatch(buffer, x, topk_idx, weights, num_experts, **overrides)  # noqa: E731

    # A tensor describe() rejects (a dtype epcomm does not move).
    expect_raised_by_every_rank(ctx, 1, lambda: fresh(topk_weights=weights.to(torch.complex64)), fresh,
                                epcomm.InvalidArgumentError, ("dispatch", "topk_weights", "complex64"))
    _checked_round_trip(ctx, buffer, seed=42)
    # An integer outside the C++ int.
    expect_raised_by_every_rank(ctx, last, lambda: fresh(expert_alignment=2**40), fresh,
                                epcomm.InvalidArgumentError, ("expert_alignment", str(2**40)))
    _checked_round_trip(ctx, buffer, seed=43)
    # A missing argument.
    expect_raised_by_every_rank(ctx, 0, lambda: fresh(num_tokens_per_expert=None), fresh,
                                epcomm.InvalidArgumentError, ("num_tokens_per_expert", "required"))
    _checked_round_trip(ctx, buffer, seed=44)

    recv_x, _, _, _, handle, _ = fresh()
    # Cached dispatch with a handle of the wrong type.
    expect_raised_by_every_rank(ctx, 1, lambda: buffer.dispatch(x, handle=("not", "a", "handle")),
                                lambda: buffer.dispatch(x, handle=handle), epcomm.InvalidArgumentError,
                                ("dispatch", "handle"))
    # Combine with a bias that is neither a tensor nor a pair, then with x that is not a tensor.
    expect_raised_by_every_rank(ctx, 0, lambda: buffer.combine(recv_x, handle, bias=(None, None, None)),
                                lambda: buffer.combine(recv_x, handle), epcomm.InvalidArgumentError,
                                ("combine", "bias"))
    expect_raised_by_every_rank(ctx, last, lambda: buffer.combine(recv_x.tolist(), handle),
                                lambda: buffer.combine(recv_x, handle), epcomm.InvalidArgumentError,
                                ("combine", "x", "torch.Tensor"))
    _checked_round_trip(ctx, buffer, seed=45)

    # An argument that only the binding's conversion rejects (a Config dict without a field).
    def without_a_field() -> Any:
        buffer._config_fields = lambda config, op: {"num_sms": 20}
        try:
            return fresh()
        finally:
            del buffer._config_fields
    expect_raised_by_every_rank(ctx, 0, without_a_field, fresh, epcomm.InvalidArgumentError,
                                ("config", "missing field"))
    _checked_round_trip(ctx, buffer, seed=46)
    buffer.destroy()


@pytest.mark.worlds("cpu2", "cpu4")
def test_python_side_errors_of_normal_mode_are_raised_by_every_rank(world) -> None:
    world.run(check_normal_mode_rejections)


# ---- low-latency mode ---------------------------------------------------------------------------------


def _low_latency_inputs(ctx: Any, seed: int):
    num_experts = 2 * ctx.size
    num_tokens = MAX_TOKENS - ctx.rank % 2
    x = ref.tokens(ctx.rank, num_tokens, HIDDEN, seed)
    topk_idx, weights = ref.routing(ctx.rank, num_tokens, NUM_TOPK, num_experts, seed)
    return x, ref.duplicate_slots(topk_idx), weights, num_experts


def _checked_low_latency_round_trip(ctx: Any, buffer: epcomm.Buffer, seed: int) -> None:
    """A bf16 low-latency dispatch and a combine of dyadic expert outputs, checked against the reference."""
    x, topk_idx, weights, num_experts = _low_latency_inputs(ctx, seed)
    received, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts,
                                                                     use_fp8=False)
    everyone = ctx.gather((x, topk_idx))
    rows = ref.low_latency_rows(ctx.rank, num_experts, [t for _, t in everyone])
    assert_equal(recv_count, torch.tensor([len(r) for r in rows], dtype=torch.int32), "recv_count")
    for l, expert_rows in enumerate(rows):
        want = torch.stack([everyone[s][0][t] for s, t in expert_rows]) if expert_rows else x[:0]
        assert_equal(received[l, :len(expert_rows)], want, f"recv_x of local expert {l} (seed {seed})")
    expert_out = ref.dyadic_tokens(ctx.rank, received.shape, seed=seed + 1)
    combined = buffer.low_latency_combine(expert_out, topk_idx, weights, handle)[0]
    all_rows = [ref.low_latency_rows(r, num_experts, [t for _, t in everyone]) for r in range(ctx.size)]
    want = ref.low_latency_combine(ctx.rank, num_experts, MAX_TOKENS, topk_idx, weights, ctx.gather(expert_out),
                                   all_rows)
    assert_equal(combined, want.to(torch.bfloat16), f"combined_x (seed {seed})")


def check_low_latency_rejections(ctx: Any) -> None:
    x, topk_idx, weights, num_experts = _low_latency_inputs(ctx, seed=51)
    buffer = low_latency_buffer(ctx, MAX_TOKENS, HIDDEN, num_experts, timeout_s=TIMEOUT_S)
    last = ctx.size - 1
    dispatch = lambda **extra: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts,  # noqa: E731
                                                           use_fp8=False, **extra)

    # A DeepEP fork argument: UnsupportedError on every rank.
    expect_raised_by_every_rank(ctx, 1, lambda: dispatch(use_nvfp4=True), dispatch, epcomm.UnsupportedError,
                                ("low_latency_dispatch", "use_nvfp4"))
    _checked_low_latency_round_trip(ctx, buffer, seed=52)
    # An unknown keyword: the rank's own TypeError, an InvalidArgumentError naming it on the peers.
    expect_raised_by_every_rank(ctx, 0, lambda: dispatch(not_an_argument=1), dispatch, TypeError,
                                ("not_an_argument",))
    _checked_low_latency_round_trip(ctx, buffer, seed=53)
    # A tensor describe() rejects.
    expect_raised_by_every_rank(ctx, last, lambda: buffer.low_latency_dispatch(x, topk_idx.to(torch.complex64),
                                                                               MAX_TOKENS, num_experts),
                                dispatch, epcomm.InvalidArgumentError, ("topk_idx", "complex64"))
    _checked_low_latency_round_trip(ctx, buffer, seed=54)

    # Combine given a handle that is not the 5-tuple, then one with an integer outside the C++ int.
    for bad_rank, spoil, words in ((1, lambda h: h[:4], ("low_latency_combine", "handle")),
                                   (0, lambda h: h[:3] + (2**40, num_experts), ("handle[3] (hidden)", str(2**40)))):
        received, _, handle, _, _ = dispatch()
        combine = lambda h: buffer.low_latency_combine(received, topk_idx, weights, h)  # noqa: E731
        expect_raised_by_every_rank(ctx, bad_rank, lambda: combine(spoil(handle)), lambda: combine(handle),
                                    epcomm.InvalidArgumentError, words)
        _checked_low_latency_round_trip(ctx, buffer, seed=55 + bad_rank)

    # clean_low_latency_buffer with an integer outside the C++ int.
    clean = lambda hidden: buffer.clean_low_latency_buffer(MAX_TOKENS, hidden, num_experts)  # noqa: E731
    expect_raised_by_every_rank(ctx, last, lambda: clean(2**33), lambda: clean(HIDDEN), epcomm.InvalidArgumentError,
                                ("clean_low_latency_buffer", "hidden"))
    clean(HIDDEN)
    _checked_low_latency_round_trip(ctx, buffer, seed=57)
    buffer.destroy()


@pytest.mark.worlds("cpu2", "cpu4")
def test_python_side_errors_of_low_latency_mode_are_raised_by_every_rank(world) -> None:
    world.run(check_low_latency_rejections)


def test_rejection_of_carries_the_code_and_the_bare_message() -> None:
    from epcomm._errors import invalid_argument, rejection_of, unsupported
    assert rejection_of(invalid_argument("dispatch", "x", "bad")) == ("invalid argument", "dispatch: x: bad")
    assert rejection_of(unsupported("low_latency_dispatch", "use_nvfp4=True")) == \
        ("not supported", "low_latency_dispatch: use_nvfp4=True")
    assert rejection_of(TypeError("f() got an unexpected keyword argument 'y'")) == \
        ("invalid argument", "TypeError: f() got an unexpected keyword argument 'y'")
