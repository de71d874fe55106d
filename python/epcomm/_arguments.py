"""Checks of plain arguments before they reach epcomm._C: integers that must fit the C++ types, and
the keyword arguments of DeepEP forks that epcomm does not provide (yet)."""
from __future__ import annotations

import operator
from typing import Any, Dict, Mapping

import torch

from ._errors import invalid_argument, unsupported

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def int32(op: str, name: str, value: Any) -> int:
    """``value`` as a Python int that fits the C++ ``int`` epcomm._C takes (pybind11 would raise a bare
    TypeError otherwise); the error names ``op``, the argument and the range."""
    try:
        number = operator.index(value)
    except TypeError:
        raise invalid_argument(op, name, f"expected an integer, got {type(value).__name__}") from None
    if not INT32_MIN <= number <= INT32_MAX:
        raise invalid_argument(op, name, f"expected an integer in [{INT32_MIN}, {INT32_MAX}] (a 32-bit int), "
                                         f"got {number}")
    return number


#: Keyword arguments of DeepEP forks, with the value that means "not used". SGLang passes the single-
#: batch-overlap ones (its DeepEP fork's low_latency_combine), NVFP4 builds of DeepEP the nvfp4 ones.
LOW_LATENCY_FORK_ARGUMENTS: Dict[str, Any] = {
    "use_nvfp4": False,
    "use_ue8m0_for_nvfp4_x_scale": False,
    "x_global_scale": None,
    "overlap": False,
    "packed_recv_count": None,
    "comp_signal": None,
    "block_m": 64,
    "threshold": 0,
    "num_sms": 3,
    "src_signals": None,
    "src_signal_expect_value": 0,
}


def _unused(value: Any, default: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return False
    return value is default or (type(value) in (bool, int) and value == default)


def reject_fork_arguments(op: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """Raises ``UnsupportedError`` naming every argument of ``known`` given a value that asks for the
    fork's feature; a name outside ``known`` is a TypeError, as for any Python function."""
    for name in given:
        if name not in known:
            raise TypeError(f"{op}() got an unexpected keyword argument {name!r}")
    used = [name for name, value in given.items() if not _unused(value, known[name])]
    if used:
        shown = ", ".join(f"{name}={_show(given[name])}" for name in used)
        raise unsupported(op, f"{shown}: argument(s) of a DeepEP fork (NVFP4 / SGLang single-batch overlap) "
                              f"are not supported yet; leave them out or at their defaults")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {value.dtype}>"
    return repr(value)
