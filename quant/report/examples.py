"""Enhanced examples for the report: one short test utterance run through a speech-enhancement model's FP32 and INT8
ONNX Runtime artifacts at report time (results.json stores no audio), for spectrograms of noisy vs FP32 vs INT8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from quant.errors import QuantError
from quant.report.rows import Row, find_row, task_kind

logger = logging.getLogger(__name__)

EXAMPLE_SECONDS = 4.0  # a few seconds keep the report cheap (an offline fixed-T model pads to one segment anyway)


@dataclass(frozen=True)
class Example:
    model: str
    utterance: str
    sample_rate: int
    signals: tuple[tuple[str, np.ndarray], ...]  # (label, audio): noisy, clean, then one per precision


def enhanced_example(model: str, rows: Sequence[Row], manifest: Path | None = None) -> Example | str:
    """The example, or a one-line note saying why there is none (not an SE model, spec, artifact or test set
    missing). The model is run as its spec says (the row names the spec file), through its task's enhancer."""
    fp32 = find_row(rows, model, "ort", "fp32")
    if task_kind([row for row in rows if row.get("model") == model]) != "se":
        return f"{model} is not a speech-enhancement model"
    artifacts: dict[str, dict[str, Path]] = {}
    for precision in ("fp32", "int8"):
        row = find_row(rows, model, "ort", precision)
        files = {stem: Path(path) for stem, path in ((row or {}).get("artifacts") or {}).items()}
        if not files or not all(path.is_file() for path in files.values()):
            return f"no ONNX Runtime {precision} artifact of {model} on this machine (run `quant run` to build it)"
        artifacts[precision] = files
    spec_file = (fp32 or {}).get("spec")
    if not spec_file or not Path(spec_file).is_file():
        return f"the rows of {model} name no spec file on this machine (results.json of an older quant run?)"
    try:
        return _run_example(model, Path(spec_file), artifacts, manifest)
    except QuantError as error:
        return f"example not rendered: {error}"


def _run_example(model: str, spec_file: Path, artifacts: dict[str, dict[str, Path]],
                 manifest: Path | None) -> Example:
    from quant.backends import open_runner
    from quant.eval import se
    from quant.spec import load_spec, resolve_manifest
    from quant.tasks import task_for
    from quant.tasks.se import SeTask

    spec = load_spec(spec_file)
    if spec.model.task != "se":
        raise QuantError(f"{model} is not a speech-enhancement model")
    source = manifest or resolve_manifest(spec.defaults.test_manifest, "test manifest")
    name, noisy, clean = se.load_pairs(str(source), 1)[0]
    rate = spec.frontend.sample_rate if spec.frontend else 16000
    keep = int(EXAMPLE_SECONDS * rate)
    noisy, clean = np.asarray(noisy[:keep], np.float32), np.asarray(clean[:keep], np.float32)
    task = task_for(spec)
    assert isinstance(task, SeTask)  # the spec's task is "se" (checked above)
    signals = [("noisy input", noisy), ("clean reference", clean)]
    for precision, files in artifacts.items():
        logger.info("report: enhancing %s with %s %s", name, model, precision)
        runners = {g.role: open_runner(files[g.stem], "ort", 1) for g in spec.graphs if g.stem in files}
        signals.append((f"ORT {precision.upper()}", task.enhancer(runners)(noisy)))
    return Example(model, name, rate, tuple(signals))
