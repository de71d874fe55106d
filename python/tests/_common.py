"""Helpers shared by the rank-side test functions."""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

import epcomm

POISON_BYTE = 0xA5


def poison_outputs(buffer: epcomm.Buffer) -> None:
    """Makes every output the buffer allocates start as 0xA5 bytes, so that rows the library forgets
    to write cannot pass as correct."""
    # The fill must come before the op's kernels on the GPU, in eager mode and inside a CUDA graph:
    # normal-mode kernels run on the comm stream, so the fill goes there (after the current stream,
    # for memory the allocator handed out for it); low-latency kernels run on the current stream.
    # Tests that pass an earlier `previous_event` use an unpoisoned buffer (the wait would order them).
    def fill(tensor: torch.Tensor, on_comm: bool) -> None:
        comm = buffer.get_comm_stream() if tensor.is_cuda else None
        if comm is not None and (on_comm or not buffer.low_latency_mode):
            if not on_comm:
                comm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(comm):
                tensor.view(-1).view(torch.uint8).fill_(POISON_BYTE)
        else:
            tensor.view(-1).view(torch.uint8).fill_(POISON_BYTE)

    def poisoned(allocate: Callable[[int, Tuple[int, ...], int], Tuple[torch.Tensor, int]], on_comm: bool):
        def allocate_poisoned(code: int, shape: Tuple[int, ...], cuda_device: int) -> Tuple[torch.Tensor, int]:
            tensor, pointer = allocate(code, shape, cuda_device)
            if tensor.numel() > 0:
                fill(tensor, on_comm)
            return tensor, pointer
        return allocate_poisoned
    buffer._allocate_here = poisoned(buffer._allocate_here, on_comm=False)
    buffer._allocate_on_comm = poisoned(buffer._allocate_on_comm, on_comm=True)


def normal_buffer(ctx: Any, hidden: int, poison: bool = True, **kwargs: Any) -> epcomm.Buffer:
    """A normal-mode buffer sized by the size hint, with poisoned outputs unless ``poison`` is False."""
    size = epcomm.Config().get_nvl_buffer_size_hint(hidden * 2, ctx.size)
    buffer = epcomm.Buffer(ctx.group, num_nvl_bytes=size, **kwargs)
    if poison:
        poison_outputs(buffer)
    return buffer


def low_latency_buffer(ctx: Any, max_tokens: int, hidden: int, num_experts: int, **kwargs: Any) -> epcomm.Buffer:
    size = epcomm.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, ctx.size, num_experts)
    buffer = epcomm.Buffer(ctx.group, num_rdma_bytes=size, low_latency_mode=True, **kwargs)
    poison_outputs(buffer)
    return buffer


def cpu(tensor: Any) -> Any:
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu()
    if isinstance(tensor, (tuple, list)):
        return type(tensor)(cpu(t) for t in tensor)
    return tensor


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual = cpu(actual)
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    same = actual.view(torch.uint8) == expected.contiguous().view(torch.uint8) if actual.dtype == torch.float8_e4m3fn \
        else actual == expected
    if not bool(same.all()):
        where = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ, first at {where}")


def expect_error(error_type: type, fragments: Tuple[str, ...], call: Callable[[], Any]) -> str:
    """Runs ``call``; it must raise ``error_type`` with every fragment in the message."""
    try:
        call()
    except error_type as e:
        message = str(e)
        missing = [f for f in fragments if f not in message]
        assert not missing, f"message {message!r} lacks {missing}"
        return message
    raise AssertionError(f"expected {error_type.__name__} mentioning {fragments}, nothing was raised")
