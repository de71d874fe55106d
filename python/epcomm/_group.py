"""How a Buffer's ranks find each other from Python: collectives over a ``torch.distributed`` group
(or an ``mpi4py`` communicator), the backend a Buffer runs, and the ranks-per-node default."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

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


MAX_RANKS_PER_NODE = 8
HOST_NAME_BYTES = 256  # a host name's record in the all-gather (longer names are cut: 255 is the POSIX bound)


#: What the C++ table (src/core/environment.cpp, parse_int) accepts as an integer: strtoll's decimal
#: form with nothing around it. Python's int() is looser (" 4", "4_0", other scripts' digits), so the
#: two front ends would disagree on the same environment.
_DECIMAL_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT32_MAX = 2**31 - 1


def _env_node_size(variable: str) -> Optional[int]:
    """$``variable`` as the C++ table reads it: None when unset or empty, else an integer in
    [1, 2^31-1], or an InvalidArgumentError naming the variable in C++'s words."""
    value = os.environ.get(variable)
    if not value:
        return None
    parsed = int(value) if _DECIMAL_INTEGER.fullmatch(value) else None
    if parsed is None or not 1 <= parsed <= _INT32_MAX:
        raise invalid_argument("Buffer", variable, f"expected an integer in [1, {_INT32_MAX}], got {value!r}")
    return parsed


def _env_ranks_per_node(num_ranks: int) -> Optional[int]:
    """$EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE, capped at ``num_ranks``; None when neither is set."""
    for variable in ("EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        parsed = _env_node_size(variable)
        if parsed is not None:
            return min(parsed, num_ranks)
    return None


def ranks_per_node_from_hosts(hosts: List[str]) -> int:
    """G from every rank's host name (in rank order): the ranks of a host must be consecutive and every
    host must hold the same number of them (SPEC §3.6: rank r is on node r / G)."""
    counts: Dict[str, int] = {}
    for host in hosts:
        counts[host] = counts.get(host, 0) + 1
    sizes = sorted(set(counts.values()))
    if len(sizes) > 1:
        described = ", ".join(f"{host}: {n}" for host, n in counts.items())
        raise invalid_argument("Buffer", "ranks_per_node",
                               f"the hosts of the group hold different numbers of ranks ({described}); every node "
                               "must hold the same number (pass ranks_per_node or set $EPCOMM_RANKS_PER_NODE)")
    size = sizes[0]
    for rank, host in enumerate(hosts):
        first = hosts[rank - rank % size]
        if host != first:
            raise invalid_argument("Buffer", "ranks_per_node",
                                   f"rank {rank} is on host {host!r} but rank {rank - rank % size} on {first!r}: the "
                                   f"ranks of a host must be consecutive ({size} per host)")
    if size > MAX_RANKS_PER_NODE:
        raise invalid_argument("Buffer", "ranks_per_node",
                               f"{size} ranks share host {hosts[0]!r}, more than {MAX_RANKS_PER_NODE} per NVLink "
                               "domain; pass ranks_per_node (or set $EPCOMM_RANKS_PER_NODE) to emulate nodes")
    return size


def gather_host_names(collectives: GroupCollectives) -> List[str]:
    """Every rank's host name, in rank order (one all-gather of fixed-size records)."""
    record = socket.gethostname().encode()[:HOST_NAME_BYTES].ljust(HOST_NAME_BYTES, b"\0")
    gathered = collectives.all_gather(record)
    return [gathered[i:i + HOST_NAME_BYTES].rstrip(b"\0").decode(errors="replace")
            for i in range(0, len(gathered), HOST_NAME_BYTES)]


def resolve_ranks_per_node(num_ranks: int, requested: Optional[int] = None,
                           collectives: Optional[GroupCollectives] = None) -> int:
    """Ranks per NVLink domain: ``requested``, else $EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE (both
    capped at ``num_ranks``), else the ranks that share a host name (gathered through ``collectives``),
    else (no group, e.g. a size hint) ``min(num_ranks, 8)``. With ``collectives`` the host names are
    always gathered, so that ranks whose environments differ still make the same collective calls (the
    C++ Buffer then reports their different ranks_per_node)."""
    hosts = gather_host_names(collectives) if collectives is not None else None
    if requested is not None:
        return int(requested)
    from_env = _env_ranks_per_node(num_ranks)
    if from_env is not None:
        return from_env
    if hosts is not None:
        return ranks_per_node_from_hosts(hosts)
    return min(num_ranks, MAX_RANKS_PER_NODE)
