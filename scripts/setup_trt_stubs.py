#!/usr/bin/env python3
"""Install the tensorrt-stubs package from PyPI and patch it so mypy can type-check quant/backends/trt.py.

TensorRT itself cannot be installed on machines without an NVIDIA GPU, but its API can still be checked statically.
The stub package needs three fixes before mypy accepts it:
  1. an empty py.typed in the installed tensorrt/ and tensorrt_bindings/ folders (PEP 561 marker);
  2. parameters named `in` (a Python keyword) in tensorrt_bindings/tensorrt.pyi are renamed `in_`;
  3. `channel_axis: int` without a default after defaulted parameters in add_scale_nd gets `= ...`.
The script is idempotent: running it again changes nothing. With --verify (the default) it then checks that mypy
reports `trt.BuilderFlag.NOT_A_FLAG` as an error, i.e. that the stubs are really in force.

Note: the stubs type IInt8Calibrator.get_batch as returning list[int]; TensorRT also accepts None to end calibration.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STUBS_PACKAGE = "tensorrt-stubs"
STUBS_VERSION = "10.13.0.35.1"
STUB_FOLDERS = ("tensorrt", "tensorrt_bindings")
BINDINGS_STUB = Path("tensorrt_bindings") / "tensorrt.pyi"

_DEF_LINE = re.compile(r"^[ \t]*def [^\n]*", re.MULTILINE)
_IN_PARAMETER = re.compile(r"(?<=[(,] )in(?=: )|(?<=\()in(?=: )")
_CHANNEL_AXIS = "power: Weights = None, channel_axis: int)"
_CHANNEL_AXIS_FIXED = "power: Weights = None, channel_axis: int = ...)"
_PROBE = "import tensorrt as trt\n\nflag = trt.BuilderFlag.NOT_A_FLAG\n"


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(STUBS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_stubs() -> None:
    if installed_version() == STUBS_VERSION:
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", f"{STUBS_PACKAGE}=={STUBS_VERSION}"]
    subprocess.run(command, check=True)


def site_root() -> Path:
    """The folder the stub package installed its tensorrt/ and tensorrt_bindings/ folders into."""
    distribution = importlib.metadata.distribution(STUBS_PACKAGE)
    return Path(str(distribution.locate_file(""))).resolve()


def fix_bindings_text(text: str) -> str:
    """Rename `in` parameters on def lines and give add_scale_nd's channel_axis a default."""
    fixed = _DEF_LINE.sub(lambda line: _IN_PARAMETER.sub("in_", line.group(0)), text)
    return fixed.replace(_CHANNEL_AXIS, _CHANNEL_AXIS_FIXED)


def patch_stubs(root: Path) -> list[str]:
    """Apply the fixes under `root`; returns what changed (empty when already patched)."""
    changes = []
    for folder in STUB_FOLDERS:
        marker = root / folder / "py.typed"
        if not (root / folder).is_dir():
            raise SystemExit(f"{root / folder} is missing: reinstall with pip install --no-deps {STUBS_PACKAGE}")
        if not marker.exists():
            marker.write_text("")
            changes.append(f"added {marker}")
    bindings = root / BINDINGS_STUB
    original = bindings.read_bytes().decode("utf-8")  # bytes: keep the file's CRLF line endings as they are
    fixed = fix_bindings_text(original)
    if fixed != original:
        bindings.write_bytes(fixed.encode("utf-8"))
        changes.append(f"fixed syntax in {bindings}")
    return changes


def verify_with_mypy() -> None:
    """Fail unless mypy, using the stubs, reports a misspelled BuilderFlag."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe_trt_stubs.py"
        probe.write_text(_PROBE)
        command = [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(Path(folder) / "cache"), str(probe)]
        result = subprocess.run(command, capture_output=True, text=True)
    if 'has no attribute "NOT_A_FLAG"' not in result.stdout:
        raise SystemExit(f"mypy did not flag BuilderFlag.NOT_A_FLAG; the stubs are not in force:\n{result.stdout}{result.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-verify", action="store_true", help="skip the mypy check of the patched stubs")
    args = parser.parse_args(argv)
    install_stubs()
    root = site_root()
    changes = patch_stubs(root)
    print("\n".join(changes) if changes else f"{STUBS_PACKAGE} {STUBS_VERSION} already patched in {root}")
    if not args.no_verify:
        verify_with_mypy()
        print("mypy flags trt.BuilderFlag.NOT_A_FLAG: stubs in force")
    return 0


if __name__ == "__main__":
    sys.exit(main())
