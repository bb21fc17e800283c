import os
from pathlib import Path

from quant.paths import engines_dir, engines_root


def test_engines_root_moves_every_stage_and_restores(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("QUANT_ENGINES", raising=False)
    assert engines_dir() == Path("engines")
    with engines_root(tmp_path / "out"):
        assert engines_dir() == tmp_path / "out"
    assert engines_dir() == Path("engines") and "QUANT_ENGINES" not in os.environ


def test_engines_root_restores_a_previous_setting(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("QUANT_ENGINES", str(tmp_path / "before"))
    with engines_root(tmp_path / "during"):
        assert engines_dir() == tmp_path / "during"
    assert engines_dir() == tmp_path / "before"
