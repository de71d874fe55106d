"""Events and overlap (SPEC §3.4): ``EventHandle`` is a point in a stream's work, ``EventOverlap``
what asynchronous calls return."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import _C


def _cuda_events_available() -> bool:
    return _C.backend_available("cuda") and torch.cuda.is_available()


class EventHandle:
    """A point in a CUDA stream's work, or an already complete point (CPU work, no CUDA).

    ``EventHandle()`` records one on the current CUDA stream (``torch.cuda.current_stream()``); it is
    complete when CUDA is not available.
    """

    __slots__ = ("native",)

    def __init__(self, native: Optional[_C.Event] = None) -> None:
        if native is None:
            recordable = _cuda_events_available()
            native = _C.Event.record(torch.cuda.current_stream().cuda_stream) if recordable else _C.Event()
        self.native = native

    def current_stream_wait(self) -> None:
        """Makes ``torch.cuda.current_stream()`` wait for the event (no host blocking)."""
        if self.native.is_cuda:
            self.native.wait(torch.cuda.current_stream().cuda_stream)

    def synchronize(self) -> None:
        """Blocks the host until the event completes."""
        self.native.synchronize()

    def query(self) -> bool:
        """True if the work before the event has finished."""
        return self.native.query()


class EventOverlap:
    """The completion of an asynchronous call, for overlapping communication with computation.

    Attributes:
        event: the ``EventHandle`` (``None`` when the call was synchronous: nothing to wait for).
        extra_tensors: tensors kept alive until this object goes, i.e. the inputs and outputs of the
            in-flight work (what ``record_stream`` does, in a CUDA-graph-friendly way).

    ``with event: ...`` runs the block, then makes the current stream wait for the event.
    """

    __slots__ = ("event", "extra_tensors")

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes ``torch.cuda.current_stream()`` wait for the event. A no-op when there is no event
        (synchronous calls: their work is already ordered before the caller's later work)."""
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.current_stream_wait()
