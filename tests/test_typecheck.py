"""mypy checks the TensorRT backend against tensorrt-stubs (installed and patched by scripts/setup_trt_stubs.py).

A mutant copy of quant/backends/trt.py with a misspelled BuilderFlag is checked in the same run: it must be flagged,
which proves that the backend's `trt` name is typed by the stubs (not Any through the lazy import).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("quant/backends/trt.py", "quant/backends/trt_inputs.py", "quant/artifacts/trt_build.py")
GOOD_LINE = "config.set_flag(trt.BuilderFlag.FP16)"
BAD_LINE = "config.set_flag(trt.BuilderFlag.NOT_A_FLAG)"


def _stubs_installed() -> bool:
    try:
        importlib.metadata.version("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _stubs_installed(), reason="tensorrt-stubs not installed: run python scripts/setup_trt_stubs.py")
def test_trt_backend_type_checks_against_the_stubs(tmp_path: Path) -> None:
    source = (REPO / CHECKED[0]).read_text()
    assert GOOD_LINE in source
    mutant = tmp_path / "trt_mutant.py"
    mutant.write_text(source.replace(GOOD_LINE, BAD_LINE))
    command = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
               "--cache-dir", str(tmp_path / "cache"), *CHECKED, str(mutant)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    ours = [line for line in errors if not line.startswith(str(mutant))]
    assert ours == [], result.stdout
    assert any('"type[BuilderFlag]" has no attribute "NOT_A_FLAG"' in line for line in errors), result.stdout + result.stderr


def _setup_script() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("setup_trt_stubs", REPO / "scripts" / "setup_trt_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stub_fixes_are_exact_and_idempotent() -> None:
    script = _setup_script()
    broken = (
        "class IPluginV3:\r\n"
        "    def get_workspace_size(self, in: list[int], out: list[int]) -> int:\r\n"
        "        \"\"\"\r\n            :arg in: The input tensors.\r\n        \"\"\"\r\n"
        "    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, scale: Weights = None, "
        "power: Weights = None, channel_axis: int) -> IScaleLayer:\r\n"
    )
    fixed = script.fix_bindings_text(broken)  # type: ignore[attr-defined]
    assert "def get_workspace_size(self, in_: list[int], out: list[int])" in fixed
    assert ":arg in: The input tensors." in fixed  # docstrings untouched
    assert "channel_axis: int = ...) -> IScaleLayer" in fixed
    assert fixed.count("\r\n") == broken.count("\r\n")  # line endings kept
    assert script.fix_bindings_text(fixed) == fixed  # type: ignore[attr-defined]
    compile(fixed.replace("\r\n", "\n").replace("ITensor", "int").replace("ScaleMode", "int")
            .replace("Weights", "int").replace("IScaleLayer", "int") + "        ...\n", "stub", "exec")
