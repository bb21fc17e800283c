"""Where quant finds its shipped data and writes its outputs. Environment variables override the defaults."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
REPO_DIR = PACKAGE_DIR.parent


def calib_data_dir() -> Path:
    """The committed calibration/test sets (QUANT_CALIB_DATA overrides)."""
    return Path(os.environ.get("QUANT_CALIB_DATA", REPO_DIR / "calib_data"))


def engines_dir() -> Path:
    """Output root for exports, caches, artifacts and reports (QUANT_ENGINES overrides; default ./engines)."""
    return Path(os.environ.get("QUANT_ENGINES", "engines"))


@contextmanager
def engines_root(root: Path) -> Iterator[Path]:
    """Point every stage (exports, cache store, builds) at `root` for the duration, as QUANT_ENGINES would."""
    previous = os.environ.get("QUANT_ENGINES")
    os.environ["QUANT_ENGINES"] = str(root)
    try:
        yield root
    finally:
        if previous is None:
            del os.environ["QUANT_ENGINES"]
        else:
            os.environ["QUANT_ENGINES"] = previous
