"""pytest wiring: the ``world`` fixture runs a test on every rank of a process pool.

A test taking ``world`` runs on the CPU backend (gloo) with 2 and 4 ranks, and on the CUDA backend
(NCCL) with 2, 4 and 8 ranks when that many GPUs are visible (skipped otherwise). Narrow it with
``@pytest.mark.worlds("cpu2", "cuda2", ...)``. Tests are ordered so that each pool runs its tests
back to back. ``EPCOMM_TEST_WORLDS=cpu2,cuda8`` restricts every test to those worlds.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import pytest
import torch

from _harness import PoolCache

ALL_WORLDS = ["cpu2", "cpu4", "cuda2", "cuda4", "cuda8"]


def _parse(world: str) -> Tuple[str, int]:
    kind = "cpu" if world.startswith("cpu") else "cuda"
    return kind, int(world[len(kind):])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "worlds(*names): the worlds (cpu2, cpu4, cuda2, ...) a test runs in")


def _worlds_for(metafunc: pytest.Metafunc) -> List[str]:
    marker = metafunc.definition.get_closest_marker("worlds")
    worlds = list(marker.args) if marker else ALL_WORLDS
    only = os.environ.get("EPCOMM_TEST_WORLDS")
    if only:
        worlds = [w for w in worlds if w in only.split(",")]
    return worlds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "world" in metafunc.fixturenames:
        worlds = _worlds_for(metafunc)
        metafunc.parametrize("world", worlds, indirect=True, ids=worlds)


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    def world_of(item: pytest.Item) -> str:
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("world", "") if callspec else ""
    order = {w: i for i, w in enumerate([""] + ALL_WORLDS)}
    items.sort(key=lambda item: order.get(world_of(item), 0))  # stable: file order inside a world


@pytest.fixture(scope="session")
def pool_cache():
    cache = PoolCache()
    yield cache
    cache.close()


@pytest.fixture
def world(request: pytest.FixtureRequest, pool_cache: PoolCache):
    kind, size = _parse(request.param)
    if kind == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < size:
            pytest.skip(f"needs {size} GPUs, {available} visible")
        import epcomm
        if not epcomm._C.backend_available("cuda"):
            pytest.skip("this build of epcomm has no CUDA backend")
    return pool_cache.get(kind, size)
