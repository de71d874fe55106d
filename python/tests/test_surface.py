"""The rest of the surface: static helpers, Config, the Buffer lifecycle and its construction paths,
views of the communication memory, and errors for bad inputs (SPEC §2, §5, §6)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import epcomm
import reference as ref
from _common import assert_equal, expect_error, normal_buffer

HIDDEN = 256


# ---- in-process checks (no group needed) ---------------------------------------------------------

def test_public_names() -> None:
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):
        assert hasattr(epcomm, name), name
    assert epcomm.topk_idx_t is torch.int64
    from epcomm.buffer import Buffer  # DeepEP's module paths
    from epcomm.utils import EventHandle, EventOverlap
    assert Buffer is epcomm.Buffer and EventOverlap is epcomm.EventOverlap and EventHandle is epcomm.EventHandle
    assert isinstance(EventOverlap(EventHandle()), epcomm.EventOverlap)
    assert isinstance(epcomm.__version__, str)
    for method in ("get_dispatch_layout", "dispatch", "combine", "internode_dispatch", "internode_combine",
                   "low_latency_dispatch", "low_latency_combine", "get_next_low_latency_combine_buffer",
                   "clean_low_latency_buffer", "get_local_buffer_tensor", "get_comm_stream", "destroy",
                   "low_latency_update_mask_buffer", "low_latency_query_mask_buffer", "low_latency_clean_mask_buffer",
                   "set_num_sms", "capture", "get_dispatch_config", "get_combine_config",
                   "get_low_latency_rdma_size_hint", "is_sm90_compiled"):
        assert callable(getattr(epcomm.Buffer, method)), method


def test_every_variable_the_front_end_reads_is_documented() -> None:
    """docs/ENVIRONMENT.md promises every variable epcomm reads; the C++ table is checked by test_core."""
    import pathlib
    import re
    docs = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "ENVIRONMENT.md").read_text()
    read = re.compile(r"os\.environ(?:\.get\(|\[)\s*([A-Za-z_\"][A-Za-z0-9_\"]*)")
    names = set()
    for source in pathlib.Path(epcomm.__file__).parent.glob("*.py"):
        text = source.read_text()
        for found in read.findall(text):
            if found.startswith('"'):
                names.add(found.strip('"'))
            else:  # a module constant naming the variable, or a loop over names
                names.update(re.findall(rf"^{found}\s*=\s*\"([A-Z0-9_]+)\"", text, re.MULTILINE))
                for listed in re.findall(rf"for {found} in \(([^)]*)\)", text):
                    names.update(re.findall(r"\"([A-Z0-9_]+)\"", listed))
    assert {"EPCOMM_BACKEND", "EPCOMM_RANKS_PER_NODE"} <= names, names  # the scan itself works
    undocumented = sorted(name for name in names if f"`{name}`" not in docs)
    assert not undocumented, f"read by python/epcomm but not in docs/ENVIRONMENT.md: {undocumented}"


def test_error_classes() -> None:
    assert issubclass(epcomm.InvalidArgumentError, ValueError)
    assert issubclass(epcomm.UnsupportedError, NotImplementedError)
    assert issubclass(epcomm.TimeoutError, RuntimeError)
    for cls in (epcomm.InvalidArgumentError, epcomm.UnsupportedError, epcomm.TimeoutError, epcomm.PeerFailureError,
                epcomm.OutOfCapacityError, epcomm.InternalError):
        assert issubclass(cls, epcomm.Error) and issubclass(cls, RuntimeError)


def test_config_and_hints() -> None:
    config = epcomm.Config()
    assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 128)
    positional = epcomm.Config(24, 8, 288, 16, 128)
    assert positional.num_max_nvl_chunked_recv_tokens == 288 and positional != config
    small = epcomm.Config(20, 6, 64, 6, 128).get_nvl_buffer_size_hint(7168 * 2, 8)
    large = epcomm.Config(20, 6, 512, 6, 128).get_nvl_buffer_size_hint(7168 * 2, 8)
    assert 0 < small < large
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8, ranks_per_node=8) == 0, "one node needs no RDMA memory"
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16, ranks_per_node=8) > 0
    hint = epcomm.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 64)
    assert hint > epcomm.Buffer.get_low_latency_rdma_size_hint(64, 7168, 8, 64) > 0
    expect_error(epcomm.InvalidArgumentError, ("hidden",),
                 lambda: epcomm.Buffer.get_low_latency_rdma_size_hint(128, 100, 8, 64))
    expect_error(epcomm.InvalidArgumentError, ("num_sms",),
                 lambda: epcomm.Config(num_sms=5).get_nvl_buffer_size_hint(256, 2))
    expect_error(epcomm.InvalidArgumentError, ("hidden_bytes",), lambda: config.get_nvl_buffer_size_hint(0, 2))


def test_set_num_sms_and_default_configs() -> None:
    try:
        epcomm.Buffer.set_num_sms(24)
        assert epcomm.Buffer.num_sms == 24
        for num_ranks in (2, 3, 8, 16):
            assert epcomm.Buffer.get_dispatch_config(num_ranks).num_sms == 24
            assert epcomm.Buffer.get_combine_config(num_ranks).num_sms == 24
        expect_error(epcomm.InvalidArgumentError, ("num_sms", "7"), lambda: epcomm.Buffer.set_num_sms(7))
        assert epcomm.Buffer.num_sms == 24
    finally:
        epcomm.Buffer.set_num_sms(20)


def test_events_without_work() -> None:
    assert isinstance(epcomm.Buffer.is_sm90_compiled(), bool)
    captured = epcomm.Buffer.capture()
    assert isinstance(captured, epcomm.EventOverlap) and isinstance(captured.event, epcomm.EventHandle)
    captured.current_stream_wait()
    assert captured.event.query()
    with epcomm.EventOverlap() as nothing:
        assert nothing.event is None
    epcomm.EventOverlap(None).current_stream_wait()


def test_group_or_comm_required() -> None:
    expect_error(epcomm.InvalidArgumentError, ("group",), lambda: epcomm.Buffer(None))


# ---- rank-side checks ----------------------------------------------------------------------------

class TorchComm:
    """An mpi4py-like communicator over the torch group (for the ``comm=`` construction path)."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self._ctx.rank

    def Get_size(self) -> int:  # noqa: N802
        return self._ctx.size

    def allgather(self, value: Any) -> list:
        return self._ctx.gather(value)

    def Barrier(self) -> None:  # noqa: N802
        import torch.distributed as dist
        dist.barrier(group=self._ctx.group)


def round_trip(ctx: Any, buffer: epcomm.Buffer, seed: int) -> None:
    """A dispatch + combine whose result is known: each token comes back times its receiver count."""
    x = ref.tokens(ctx.rank, 8, HIDDEN, seed).to(ctx.device)
    topk_idx, _ = ref.routing(ctx.rank, 8, 2, 2 * ctx.size, seed)
    layout = buffer.get_dispatch_layout(topk_idx.to(ctx.device), 2 * ctx.size)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                                 num_tokens_per_expert=layout[2], topk_idx=topk_idx.to(ctx.device))
    combined, _, _ = buffer.combine(recv_x, handle)
    expected = (x.float() * layout[3].sum(dim=1, keepdim=True).float()).to(torch.bfloat16)
    assert_equal(combined.cpu(), expected.cpu(), "combined_x of a round trip")


def check_lifecycle(ctx: Any) -> None:
    size = epcomm.Config().get_nvl_buffer_size_hint(HIDDEN * 2, ctx.size)
    # every DeepEP argument, by keyword
    buffer = epcomm.Buffer(ctx.group, num_nvl_bytes=size, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=12,
                           allow_nvlink_for_low_latency_mode=False, allow_mnnvl=False, use_fabric=False,
                           explicitly_destroy=True, enable_shrink=False, comm=None)
    assert (buffer.rank, buffer.group_size, buffer.num_nvl_bytes) == (ctx.rank, ctx.size, size)
    assert buffer.backend == ctx.kind
    stream = buffer.get_comm_stream()
    assert (stream is None) if ctx.kind == "cpu" else isinstance(stream, torch.cuda.Stream)
    round_trip(ctx, buffer, seed=1)
    buffer.destroy()
    buffer.destroy()  # idempotent
    expect_error(epcomm.InvalidArgumentError, ("destroyed",),
                 lambda: buffer.get_dispatch_layout(torch.zeros(1, 1, dtype=torch.int64, device=ctx.device), ctx.size))
    # a buffer can be created again in the same process; positional arguments as in DeepEP
    again = epcomm.Buffer(ctx.group, size, 0, False)
    round_trip(ctx, again, seed=2)
    again.destroy()
    # mpi4py-style communicator instead of a group
    by_comm = epcomm.Buffer(None, size, comm=TorchComm(ctx), backend=ctx.kind)
    round_trip(ctx, by_comm, seed=3)
    by_comm.destroy()
    # without destroy(): released when collected
    dropped = epcomm.Buffer(ctx.group, size)
    round_trip(ctx, dropped, seed=4)
    del dropped


def check_construction_errors(ctx: Any) -> None:
    expect_error(epcomm.InvalidArgumentError, ("backend", "tpu"),
                 lambda: epcomm.Buffer(ctx.group, 1 << 20, backend="tpu"))
    expect_error(epcomm.InvalidArgumentError, ("num_nvl_bytes",), lambda: epcomm.Buffer(ctx.group, -1))
    if ctx.kind == "cpu" and not torch.cuda.is_available():
        expect_error(epcomm.UnsupportedError, ("cuda",), lambda: epcomm.Buffer(ctx.group, 1 << 20, backend="cuda"))
    # arguments that differ between ranks are caught at construction, on every rank
    expect_error(epcomm.InvalidArgumentError, ("num_nvl_bytes", "same on every rank"),
                 lambda: epcomm.Buffer(ctx.group, (1 << 20) + 4096 * ctx.rank))


def check_local_buffer_tensor(ctx: Any) -> None:
    size = epcomm.Config().get_nvl_buffer_size_hint(HIDDEN * 2, ctx.size)
    buffer = epcomm.Buffer(ctx.group, num_nvl_bytes=size)
    whole = buffer.get_local_buffer_tensor(torch.uint8)
    assert whole.shape == (size,) and whole.device.type == ctx.device.type
    view = buffer.get_local_buffer_tensor(torch.float32, torch.Size([4, 8]), offset=64)
    assert view.shape == (4, 8) and view.dtype == torch.float32
    pattern = torch.arange(32, dtype=torch.float32, device=ctx.device).view(4, 8) + 1000 * ctx.rank
    view.copy_(pattern)
    # the same memory seen through other views
    reread = buffer.get_local_buffer_tensor(torch.float32, 32, offset=64)
    assert_equal(reread.cpu(), pattern.view(-1).cpu(), "re-read view")
    assert_equal(whole[64:64 + 128].cpu(), pattern.view(-1).view(torch.uint8).cpu(), "bytes under the view")
    tail = buffer.get_local_buffer_tensor(torch.bfloat16, offset=size - 16)
    assert tail.shape == (8,)
    expect_error(epcomm.InvalidArgumentError, ("offset",),
                 lambda: buffer.get_local_buffer_tensor(torch.float32, offset=2))
    expect_error(epcomm.InvalidArgumentError, ("size",),
                 lambda: buffer.get_local_buffer_tensor(torch.float32, size // 4 + 1))
    expect_error(epcomm.InvalidArgumentError, ("offset",),
                 lambda: buffer.get_local_buffer_tensor(torch.uint8, offset=size + 1))
    # the rdma memory of a buffer without any is empty
    assert buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True).numel() == 0
    del view, whole, tail
    buffer.destroy()
    # a view keeps the buffer's memory alive after the Python object is gone (until destroy())
    kept = epcomm.Buffer(ctx.group, num_nvl_bytes=size).get_local_buffer_tensor(torch.int32, 16)
    import gc
    gc.collect()
    kept.copy_(torch.arange(16, dtype=torch.int32, device=ctx.device))
    assert int(kept.sum()) == 120
    del kept
    gc.collect()


def check_bad_inputs(ctx: Any) -> None:
    buffer = normal_buffer(ctx, HIDDEN)
    num_experts = 2 * ctx.size
    x = ref.tokens(ctx.rank, 8, HIDDEN, seed=5).to(ctx.device)
    topk_idx, weights = ref.routing(ctx.rank, 8, 2, num_experts, seed=5)
    topk_idx, weights = topk_idx.to(ctx.device), weights.to(ctx.device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    invalid = epcomm.InvalidArgumentError

    # get_dispatch_layout
    expect_error(invalid, ("num_experts",), lambda: buffer.get_dispatch_layout(topk_idx, num_experts + 1))
    expect_error(invalid, ("topk_idx", "float32"), lambda: buffer.get_dispatch_layout(weights, num_experts))
    expect_error(invalid, ("topk_idx", "expected 2 dims"), lambda: buffer.get_dispatch_layout(topk_idx[0], num_experts))
    expect_error(invalid, ("topk_idx",), lambda: buffer.get_dispatch_layout(topk_idx.t(), num_experts))
    expect_error(invalid, ("topk_idx", "Tensor"), lambda: buffer.get_dispatch_layout([[0]], num_experts))
    out_of_range = topk_idx.clone()
    out_of_range[1, 0] = num_experts
    # Checked by the kernels on the CUDA backend: reported by check_errors() (or the next call)
    expect_error(invalid, ("topk_idx", str(num_experts)),
                 lambda: (buffer.get_dispatch_layout(out_of_range, num_experts), buffer.check_errors()))

    # dispatch
    expect_error(invalid, ("x", "float16"), lambda: buffer.dispatch(x.half(), topk_idx=topk_idx, **layout))
    expect_error(invalid, ("x", "expected 2 dims"),
                 lambda: buffer.dispatch(x.view(2, 4, HIDDEN), topk_idx=topk_idx, **layout))
    expect_error(invalid, ("x", "dims"),
                 lambda: buffer.dispatch(x.view(1, 1, 1, 8, HIDDEN), topk_idx=topk_idx, **layout))
    expect_error(invalid, ("x",), lambda: buffer.dispatch((x, x, x), topk_idx=topk_idx, **layout))
    expect_error(invalid, ("x_scales",),
                 lambda: buffer.dispatch(x.to(torch.float8_e4m3fn), topk_idx=topk_idx, **layout))
    expect_error(invalid, ("topk_weights",),
                 lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights[:, :1].contiguous(), **layout))
    expect_error(invalid, ("num_tokens_per_expert",), lambda: buffer.dispatch(x, topk_idx=topk_idx))
    expect_error(invalid, ("is_token_in_rank",),
                 lambda: buffer.dispatch(x, topk_idx=topk_idx, num_tokens_per_expert=per_expert,
                                         is_token_in_rank=in_rank[:-1].contiguous()))
    expect_error(invalid, ("expert_alignment",),
                 lambda: buffer.dispatch(x, topk_idx=topk_idx, expert_alignment=0, **layout))
    expect_error(invalid, ("handle",), lambda: buffer.dispatch(x, handle=(1, 2, 3)))
    expect_error(invalid, ("previous_event",),
                 lambda: buffer.dispatch(x, topk_idx=topk_idx, previous_event="now", **layout))
    expect_error(invalid, ("config",),
                 lambda: buffer.dispatch(x, topk_idx=topk_idx, config=(20, 6, 256, 6, 128), **layout))

    # combine
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    expect_error(invalid, ("handle",), lambda: buffer.dispatch(x, handle=handle, topk_idx=topk_idx))
    expect_error(invalid, ("x",),
                 lambda: buffer.combine(x if recv_x.size(0) == 0 else recv_x[:0], handle))
    expect_error(invalid, ("x", "bfloat16"), lambda: buffer.combine(recv_x.float(), handle))
    expect_error(invalid, ("bias",), lambda: buffer.combine(recv_x, handle, bias=x[:1].contiguous()))
    expect_error(invalid, ("bias",), lambda: buffer.combine(recv_x, handle, bias=(x, x, x)))
    expect_error(invalid, ("handle",), lambda: buffer.combine(recv_x, handle[:4]))
    other = normal_buffer(ctx, HIDDEN)
    expect_error(invalid, ("handle", "another Buffer"), lambda: other.combine(recv_x, handle))
    other.destroy()

    # the buffer still works after all of that
    combined, combined_weights, _ = buffer.combine(recv_x, handle, topk_weights=recv_weights)
    assert_equal(combined_weights.cpu(), weights.cpu(), "combined_topk_weights after errors")
    buffer.destroy()


def check_timeout(ctx: Any) -> None:
    """Rank 0 waits in dispatch for a rank that never comes: a TimeoutError naming the peer."""
    buffer = normal_buffer(ctx, HIDDEN, timeout_s=1.0)
    num_experts = 2 * ctx.size
    x = ref.tokens(ctx.rank, 8, HIDDEN, seed=6).to(ctx.device)
    topk_idx, _ = ref.routing(ctx.rank, 8, 2, num_experts, seed=6)
    message = None
    if ctx.rank == 0:
        layout = buffer.get_dispatch_layout(topk_idx.to(ctx.device), num_experts)
        message = expect_error(epcomm.TimeoutError, ("dispatch",),
                               lambda: buffer.dispatch(x, num_tokens_per_expert=layout[2],
                                                       topk_idx=topk_idx.to(ctx.device)))
        assert any(str(peer) in message for peer in range(1, ctx.size)), f"the message names no peer: {message}"
    ctx.gather(None)  # everyone waits for rank 0's timeout, then drops the buffer without talking to peers
    del buffer


# ---- tests ---------------------------------------------------------------------------------------

def test_buffer_lifecycle(world) -> None:
    world.run(check_lifecycle)


def test_construction_errors(world) -> None:
    world.run(check_construction_errors)


def test_get_local_buffer_tensor(world) -> None:
    world.run(check_local_buffer_tensor)


def test_bad_inputs(world) -> None:
    world.run(check_bad_inputs)


@pytest.mark.worlds("cpu2", "cuda2")
def test_timeout_names_the_peer(world) -> None:
    world.run(check_timeout)
