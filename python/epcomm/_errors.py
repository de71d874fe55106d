"""Errors raised by the Python layer itself, in the same classes and format as the C++ core's."""
from __future__ import annotations

from typing import Tuple

from ._C import BufferFailed, InvalidArgumentError, OutOfCapacityError, UnsupportedError

__all__ = ["BufferFailed", "invalid_argument", "rejection_of", "unsupported"]

#: The error codes a rejected call carries to the peers (to_string(epcomm::ErrorCode)), by class.
_INPUT_ERROR_CODES = ((UnsupportedError, "not supported"), (OutOfCapacityError, "out of capacity"),
                      (InvalidArgumentError, "invalid argument"))


def invalid_argument(op: str, arg: str, message: str) -> InvalidArgumentError:
    """An error for a bad argument: ``epcomm: invalid argument: <op>: <arg>: <message>``."""
    return InvalidArgumentError(f"epcomm: invalid argument: {op}: {arg}: {message}")


def unsupported(op: str, message: str) -> UnsupportedError:
    return UnsupportedError(f"epcomm: not supported: {op}: {message}")


def rejection_of(error: BaseException) -> Tuple[str, str]:
    """``(code, message)`` with which a call's peers learn of ``error``, raised by this rank's Python
    side before the call reached the core: an epcomm input error keeps its code and its message
    without the ``epcomm: <code>: `` prefix (the peers' own error adds one); any other exception (a
    TypeError, ...) is an invalid argument named by its class."""
    for error_class, code in _INPUT_ERROR_CODES:
        if isinstance(error, error_class):
            prefix = f"epcomm: {code}: "
            text = str(error)
            return code, text[len(prefix):] if text.startswith(prefix) else text
    return "invalid argument", f"{type(error).__name__}: {error}"
