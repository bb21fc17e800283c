"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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
