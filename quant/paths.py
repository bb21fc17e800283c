"""Where quant finds its shipped data and writes its outputs by default."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
REPO_DIR = PACKAGE_DIR.parent


def calib_data_dir() -> Path:
    """The committed calibration/test sets (QUANT_CALIB_DATA overrides)."""
    return Path(os.environ.get("QUANT_CALIB_DATA", REPO_DIR / "calib_data"))


# The output root (exports under export/, the calibration cache store under cache/, artifacts under
# <model>/<precision>/, reports): every stage takes it as a parameter (`out_root`), the CLI's --output sets it.
DEFAULT_OUT_ROOT = Path("engines")
