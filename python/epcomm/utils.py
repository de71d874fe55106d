"""DeepEP's ``deep_ep.utils`` import path (``from deep_ep.utils import EventHandle, EventOverlap``)."""
from .event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
