"""Where quant finds its shipped data and writes its outputs. Environment variables override the defaults."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
REPO_DIR = PACKAGE_DIR.parent


def calib_data_dir() -> Path:
    """The committed calibration/test sets (QUANT_CALIB_DATA overrides)."""
    return Path(os.environ.get("QUANT_CALIB_DATA", REPO_DIR / "calib_data"))


def engines_dir() -> Path:
    """Output root for exports, caches, artifacts and reports (QUANT_ENGINES overrides; default ./engines)."""
    return Path(os.environ.get("QUANT_ENGINES", "engines"))
