"""Shared fixtures: persistent pools of gloo CPU ranks, started once per test session."""

from __future__ import annotations

import pytest
import torch

from cocodiff.apps.launch import WorkerPool

_POOLS: dict[int, WorkerPool] = {}


def get_pool(world: int) -> WorkerPool:
    pool = _POOLS.get(world)
    if pool is None or pool.broken:
        pool = WorkerPool(world, timeout_s=300, collective_timeout_s=60)
        _POOLS[world] = pool
    return pool


@pytest.fixture(scope="session")
def pools():
    """`pools(P)` -> a WorkerPool of P gloo ranks (reused across tests; restarted after a failure)."""
    yield get_pool
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
