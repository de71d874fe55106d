"""DeepEP's ``deep_ep.utils`` import path (``from deep_ep.utils import EventHandle, EventOverlap``)
and its ``check_nvlink_connections``."""
from __future__ import annotations

import socket
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

from ._errors import unsupported
from .event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group: Any) -> None:
    """Collective over ``group``: checks that the GPUs of the ranks on this machine can reach each
    other directly, which epcomm's intra-node path needs (DeepEP checks the NVLink links of PCIe
    GPUs the same way).

    Without CUDA (the CPU backend: ranks are processes sharing host memory) there is nothing to
    check and it returns at once, without talking to the group. GPUs this process cannot see (one
    visible device per process) are not checked. Raises ``epcomm.UnsupportedError`` naming the
    pairs of ranks whose GPUs have no peer access.
    """
    if not torch.cuda.is_available():
        return
    mine = (socket.gethostname(), torch.cuda.current_device())
    everyone: List[Tuple[str, int]] = [("", -1)] * group.size()
    dist.all_gather_object(everyone, mine, group=group)
    rank = group.rank()
    visible = torch.cuda.device_count()
    missing = [
        peer for peer, (host, device) in enumerate(everyone)
        if peer != rank and host == mine[0] and device != mine[1] and device < visible
        and not torch.cuda.can_device_access_peer(mine[1], device)
    ]
    if missing:
        pairs = ", ".join(f"rank {rank} (GPU {mine[1]}) -> rank {peer} (GPU {everyone[peer][1]})" for peer in missing)
        raise unsupported("check_nvlink_connections", f"no peer access between the GPUs of {pairs}")
