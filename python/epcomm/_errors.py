"""Errors raised by the Python layer itself, in the same classes and format as the C++ core's."""
from __future__ import annotations

from ._C import BufferFailed, InvalidArgumentError, UnsupportedError

__all__ = ["BufferFailed", "invalid_argument", "unsupported"]


def invalid_argument(op: str, arg: str, message: str) -> InvalidArgumentError:
    """An error for a bad argument: ``epcomm: invalid argument: <op>: <arg>: <message>``."""
    return InvalidArgumentError(f"epcomm: invalid argument: {op}: {arg}: {message}")


def unsupported(op: str, message: str) -> UnsupportedError:
    return UnsupportedError(f"epcomm: not supported: {op}: {message}")
