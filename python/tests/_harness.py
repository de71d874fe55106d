"""One pool of rank processes per (backend, world size), reused by every test.

Starting R processes (torch import + process group) costs seconds, so each pool is started once and
then runs test functions on request: ``pool.run(fn, *args)`` calls ``fn(rank_context, *args)`` on every
rank and returns the per-rank results, or raises with every failing rank's traceback. Test functions
are looked up by module and name in the workers, so they must be module-level functions.

Ranks use gloo (CPU backend) or NCCL (CUDA backend, one GPU per rank), with a file:// rendezvous;
$EPCOMM_BACKEND is set to the world's backend in every rank process.
"""
from __future__ import annotations

import faulthandler
import importlib
import os
import queue
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.multiprocessing as mp

#: Bound of every epcomm wait inside the workers: a broken test fails fast instead of hanging.
WORKER_TIMEOUT_S = "20"
#: Bound of one pool.run() as seen from pytest ($EPCOMM_TEST_RUN_TIMEOUT_S).
RUN_TIMEOUT_S = float(os.environ.get("EPCOMM_TEST_RUN_TIMEOUT_S", "180"))


@dataclass
class RankContext:
    """What a test function gets on every rank."""
    rank: int
    size: int
    kind: str  # 'cpu' or 'cuda'
    group: Any  # the torch.distributed group
    device: Any  # torch.device of this rank's tensors

    def gather(self, value: Any) -> List[Any]:
        """Every rank's ``value`` (picklable; tensors are gathered as CPU tensors), in rank order."""
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, _to_wire(value), group=self.group)
        return [_from_wire(v) for v in out]


class _Fp8Wire:
    """float8 tensors do not survive torch's pickling: they travel as their bytes."""

    def __init__(self, tensor: Any) -> None:
        self.bytes = tensor.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8)
        self.shape = tuple(tensor.shape)


def _to_wire(value: Any) -> Any:
    import torch
    if isinstance(value, torch.Tensor):
        return _Fp8Wire(value) if value.dtype == torch.float8_e4m3fn else value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_wire(v) for v in value)
    return value


def _from_wire(value: Any) -> Any:
    import torch
    if isinstance(value, _Fp8Wire):
        return value.bytes.view(torch.float8_e4m3fn).view(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(_from_wire(v) for v in value)
    return value


def _worker(rank: int, size: int, kind: str, init_file: str, tasks: Any, results: Any) -> None:
    os.environ.setdefault("EPCOMM_TIMEOUT_S", WORKER_TIMEOUT_S)
    # The backend is the world's, whatever the machine has: a Buffer over a gloo group would choose
    # the CUDA backend wherever CUDA is available (epcomm/_group.py choose_backend).
    os.environ["EPCOMM_BACKEND"] = kind
    # A crash prints the Python stack of every thread; SIGUSR1 (sent by a pool.run() that timed out)
    # prints it without stopping, so a hang shows where each rank waits.
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch
    import torch.distributed as dist
    backend = "gloo" if kind == "cpu" else "nccl"
    if kind == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=120))
    device = torch.device("cpu") if kind == "cpu" else torch.device("cuda", rank)
    context = RankContext(rank, size, kind, dist.group.WORLD, device)
    while True:
        task = tasks.get()
        if task is None:
            break
        module_name, function_name, args, kwargs = task
        try:
            function = getattr(importlib.import_module(module_name), function_name)
            results.put((rank, True, function(context, *args, **kwargs)))
        except BaseException:  # noqa: B902 - every failure goes back to pytest
            results.put((rank, False, traceback.format_exc()))
    # Leave without destroy_process_group() or interpreter teardown: both can wait for peers that are
    # already gone. Results were flushed by their queue's feeder thread first.
    results.close()
    results.join_thread()
    os._exit(0)


def _unsupported(formatted_traceback: str) -> str:
    """The message of an epcomm.UnsupportedError that ended ``formatted_traceback``, else ''."""
    last = formatted_traceback.strip().splitlines()[-1]
    return last if last.startswith("epcomm.UnsupportedError") else ""


class RankPool:
    def __init__(self, kind: str, size: int) -> None:
        self.kind, self.size = kind, size
        context = mp.get_context("spawn")
        handle, self._init_file = tempfile.mkstemp(prefix="epcomm-rendezvous-")
        os.close(handle)
        os.unlink(self._init_file)  # the file:// store creates it
        self._tasks = [context.Queue() for _ in range(size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_worker, args=(r, size, kind, self._init_file, self._tasks[r], self._results),
                            daemon=True) for r in range(size)
        ]
        for process in self._processes:
            process.start()
        self.broken = False

    def run(self, function: Callable[..., Any], *args: Any, timeout: float = RUN_TIMEOUT_S, **kwargs: Any) -> List[Any]:
        """Runs ``function(rank_context, *args, **kwargs)`` on every rank; returns the results by rank."""
        if self.broken:
            raise RuntimeError("this rank pool was stopped after an earlier timeout")
        for tasks in self._tasks:
            tasks.put((function.__module__, function.__name__, args, kwargs))
        outcomes: Dict[int, Tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
                outcomes[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            dead = [(r, p.exitcode) for r, p in enumerate(self._processes) if r not in outcomes and not p.is_alive()]
            if dead or time.monotonic() > deadline:
                self._report_stuck_ranks()
                self.close()
                missing = sorted(set(range(self.size)) - set(outcomes))
                failures = "".join(f"\n--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok)
                why = f"rank processes died (rank, exit code): {dead}" if dead else f"did not finish within {timeout} s"
                raise AssertionError(f"{function.__name__}: ranks {missing}: {why}{failures}")
        failures = [(rank, value) for rank, (ok, value) in sorted(outcomes.items()) if not ok]
        if self.kind == "cuda" and len(failures) == self.size and all(_unsupported(v) for _, v in failures):
            import pytest  # every rank was told "not supported": a feature the CUDA backend lacks (yet);
            pytest.skip(_unsupported(failures[0][1]))  # the CPU reference must support everything

        if failures:
            raise AssertionError("".join(f"\n--- rank {rank} ---\n{value}" for rank, value in failures))
        return [outcomes[rank][1] for rank in range(self.size)]

    def _report_stuck_ranks(self) -> None:
        """Asks every live rank to print its Python stacks (faulthandler, to the shared stderr)."""
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGUSR1)
        time.sleep(1.0)

    def close(self) -> None:
        if not self.broken:
            for tasks in self._tasks:
                tasks.put(None)
        self.broken = True
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)


class PoolCache:
    """Keeps at most one pool alive (GPU memory), switching when another world is asked for."""

    def __init__(self) -> None:
        self._current: Optional[RankPool] = None

    def get(self, kind: str, size: int) -> RankPool:
        pool = self._current
        if pool is not None and (pool.kind, pool.size) == (kind, size) and not pool.broken:
            return pool
        self.close()
        self._current = RankPool(kind, size)
        return self._current

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
