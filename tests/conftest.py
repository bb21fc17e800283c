"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest


@pytest.fixture(scope="session")
def third_party_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], object]:
    """build(kind) -> models.BuiltModel: one of the small third-party-style test models (tests/models), trained and
    exported at opsets 11 and 13 once per session, each with its spec (docs/specs/<kind>.toml) beside it."""
    import models

    built: dict[str, models.BuiltModel] = {}

    def get(kind: str) -> models.BuiltModel:
        if kind not in built:
            built[kind] = models.build(kind, Path(tmp_path_factory.mktemp(kind)))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A RayExecutor on a local 2-CPU Ray instance, started once per session (skipped without Ray)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    from quant.executor import RayExecutor

    # workers import the shard functions by name: give them the tests folder and this checkout's package too
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield RayExecutor()
    finally:
        ray.shutdown()
