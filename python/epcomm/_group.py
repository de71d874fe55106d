"""How a Buffer's ranks find each other from Python: collectives over a ``torch.distributed`` group
(or an ``mpi4py`` communicator), the backend a Buffer runs, and the ranks-per-node default."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import _C
from ._errors import invalid_argument, unsupported

BACKENDS = ("cpu", "cuda")
#: Chooses the backend of every Buffer that is not given ``backend=``.
BACKEND_VARIABLE = "EPCOMM_BACKEND"


@dataclass
class GroupCollectives:
    rank: int
    size: int
    all_gather: Callable[[bytes], bytes]  # every rank's bytes, concatenated in rank order
    barrier: Callable[[], None]


def group_collectives(group: Optional[Any], comm: Optional[Any]) -> GroupCollectives:
    """The bootstrap collectives of ``group`` (a torch.distributed ProcessGroup) or ``comm`` (mpi4py)."""
    if group is not None:
        rank, size = group.rank(), group.size()

        def all_gather(payload: bytes) -> bytes:
            gathered = [None] * size
            dist.all_gather_object(gathered, payload, group=group)
            return b"".join(gathered)

        def barrier() -> None:
            dist.barrier(group=group)

        return GroupCollectives(rank, size, all_gather, barrier)
    if comm is not None:
        return GroupCollectives(comm.Get_rank(), comm.Get_size(), lambda payload: b"".join(comm.allgather(payload)),
                                comm.Barrier)
    raise invalid_argument("Buffer", "group", "either group (a torch.distributed ProcessGroup) or comm must be given")


def choose_backend(requested: Optional[str]) -> str:
    """The backend of a new Buffer: ``requested`` if given, else $EPCOMM_BACKEND, else 'cuda' when torch
    sees a CUDA device and this build has the CUDA backend, else 'cpu'.

    The group does not choose: as in DeepEP it only bootstraps the ranks, so a gloo group (vLLM's
    ``cpu_group``) drives the CUDA backend for CUDA tensors. Ask for 'cpu' to run the CPU reference
    backend on a machine with GPUs.
    """
    source = "backend"
    if requested is None and os.environ.get(BACKEND_VARIABLE):
        requested, source = os.environ[BACKEND_VARIABLE], BACKEND_VARIABLE
    if requested is not None:
        if requested not in BACKENDS:
            raise invalid_argument("Buffer", source, f"expected one of {BACKENDS}, got {requested!r}")
        return requested
    cuda_usable = torch.cuda.is_available() and _C.backend_available("cuda")
    return "cuda" if cuda_usable else "cpu"


def backend_device(backend: str) -> torch.device:
    """The device a Buffer of ``backend`` works on: the CPU, or the current CUDA device."""
    if backend == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise unsupported("Buffer", "backend 'cuda' needs a CUDA device but torch.cuda.is_available() is False "
                                    "(use backend='cpu' or EPCOMM_BACKEND=cpu)")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_ranks_per_node(num_ranks: int, requested: Optional[int] = None) -> int:
    """Ranks per NVLink domain: ``requested``, else $EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE (both
    capped at ``num_ranks``), else ``min(num_ranks, 8)``."""
    if requested is not None:
        return int(requested)
    for variable in ("EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        value = os.environ.get(variable)
        if value:
            try:
                return min(int(value), num_ranks)
            except ValueError:
                raise invalid_argument("Buffer", variable, f"expected an integer, got {value!r}") from None
    return min(num_ranks, 8)
