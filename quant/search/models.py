"""The search's callables for today's reference models (dpcrn, dpcrn-stream, wenet-encoder) and any ONNX file
with a calibration cache: builds through quant.artifacts.build_artifact, evaluation through quant.eval.se / asr on the
committed test sets (first half: validation; second half: held out). A model spec (issue 10) plugs in the same
way: it needs a Builder, the three Evaluators and timing feeds."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from quant.backends.ort import OrtRunner
from quant.errors import ModelError
from quant.search.budget import SNR_CAP_DB
from quant.search.core import MODEL_FILE, Columns, Problem
from quant.search.speed import Feeds, Latency, interleaved_latency, node_times_ms
from quant.search.units import find_units

log = logging.getLogger(__name__)

SE_MODELS = {"dpcrn": False, "dpcrn-stream": True}  # model -> streaming
ASR_MODELS = ("wenet-encoder",)
PROXY_UTTERANCES = 2


@dataclass(frozen=True)
class ArtifactBuilder:
    """rules file, out dir -> INT8 artifact folder (build_artifact with the given calibration cache)."""

    model: str | Path
    cache: Path | None = None

    def __call__(self, rules: Path, out_dir: Path) -> Path:
        from quant.artifacts.artifact import build_artifact

        name, source = resolve_reference(self.model)
        return build_artifact(source, "int8", name=name, rules=rules, out_dir=out_dir, cache=self.cache)


def output_snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(((reference.astype(np.float64) - test) ** 2).sum())
    power = float((reference.astype(np.float64) ** 2).sum())
    if noise == 0.0:
        return SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10 * np.log10(max(power, 1e-30) / noise)))


@dataclass
class SeEvaluator:
    """artifact folder -> per-utterance PESQ/STOI/SI-SDR (unless `task` is off) and `snr_db` of the enhanced audio
    against the FP32 artifact's. Streaming models run frame by frame with their own states fed back."""

    pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]
    streaming: bool
    fp32: Path
    task: bool = True
    _reference: list[np.ndarray] = field(default_factory=list)
    _noisy: dict[str, Any] = field(default_factory=dict)  # noisy-input scores, the same for every build

    def enhance_all(self, folder: Path) -> list[np.ndarray]:
        from quant.eval import se

        runner = OrtRunner(folder / MODEL_FILE, threads=1)
        enhance = se.enhance_streaming if self.streaming else se.enhance_offline
        return [enhance(runner, noisy) for _, noisy, _ in self.pairs]

    def __call__(self, folder: Path) -> Columns:
        from quant.eval import se

        if not self._reference:
            self._reference.extend(self.enhance_all(self.fp32))
        outputs = self._reference if folder == self.fp32 else self.enhance_all(folder)
        columns: dict[str, list[Any]] = {"ids": [name for name, _, _ in self.pairs]}
        if self.task:
            rows = iter(outputs)
            result = se.evaluate_se(lambda _: next(rows), self.pairs, self._noisy or None)
            self._noisy.update({name: before for name, before, _ in result.per_utterance})
            columns.update(result.per_utterance_columns())
        columns["snr_db"] = [output_snr_db(ref, out) for ref, out in zip(self._reference, outputs)]
        return columns


@dataclass
class AsrEvaluator:
    """encoder artifact folder -> per-utterance CER/WER edit counts (FP32 decoder for rescoring unless `task` is
    off) and `snr_db` of encoder_out against the FP32 encoder's."""

    samples: Sequence[Any]
    decoder: Path
    fp32: Path
    task: bool = True
    _reference: list[np.ndarray] = field(default_factory=list)

    def encoder_outputs(self, folder: Path) -> list[np.ndarray]:
        from quant.eval.asr import encoder_feeds

        runner = OrtRunner(folder / MODEL_FILE, threads=1)
        return [runner.run(encoder_feeds([s.audio]))["encoder_out"] for s in self.samples]

    def __call__(self, folder: Path) -> Columns:
        from quant.eval.asr import evaluate_asr

        if not self._reference:
            self._reference.extend(self.encoder_outputs(self.fp32))
        outputs = self._reference if folder == self.fp32 else self.encoder_outputs(folder)
        columns: dict[str, list[Any]] = {"ids": [s.name for s in self.samples]}
        if self.task:
            encoder = OrtRunner(folder / MODEL_FILE, threads=1)
            result = evaluate_asr(encoder, OrtRunner(self.decoder, threads=1), self.samples)
            columns.update(result.per_utterance_columns())
        columns["snr_db"] = [output_snr_db(ref, out) for ref, out in zip(self._reference, outputs)]
        return columns


@dataclass(frozen=True)
class Split:
    validation: int | None = None  # utterances of the first half used by the search (None: the whole half)
    held_out: int | None = None  # utterances of the second half for the final numbers (None: the whole half)


def halves(items: Sequence[Any], split: Split) -> tuple[list[Any], list[Any]]:
    if len(items) < 2:
        raise ModelError(f"the test set has {len(items)} utterance(s); the search needs at least 2 (validation and "
                         "held-out halves)")
    half = len(items) // 2
    return list(items[:half][: split.validation]), list(items[half:][: split.held_out])


def reference_problem(model: str, out_dir: Path, split: Split, cache: Path | None = None,
                      rules: Path | None = None, rounds: int = 15) -> Problem:
    """The search problem for a reference model name or an SE ONNX file shaped like DPCRN."""
    from quant.artifacts.artifact import build_artifact
    from quant.precision import load_rules

    name, source = resolve_reference(model)
    graph = onnx.load(str(source))
    base_rules = load_rules(rules)
    cache = cache if cache is not None else _calibrated(name, source)
    fp32 = build_artifact(source, "fp32", name=name, out_dir=out_dir / "builds" / "fp32")
    validate, proxy, held_out, feeds = _task_callables(name, fp32, split)
    timer: Callable[[Sequence[Path]], Sequence[Latency]] = (
        lambda folders: interleaved_latency([f / MODEL_FILE for f in folders], feeds, rounds))
    return Problem(model=graph, units=find_units(graph, base_rules), base_rules=base_rules, fp32=fp32,
                   build=ArtifactBuilder(model, cache), validate=validate, proxy=proxy, held_out=held_out,
                   latency=timer, node_times=lambda folder: node_times_ms(folder / MODEL_FILE, feeds))


def resolve_reference(model: str | Path) -> tuple[str, Path]:
    """(artifact name, FP32 ONNX) of a reference graph name (dpcrn, dpcrn-stream, wenet-encoder, wenet-decoder),
    exported under engines/export/ on demand, or of an .onnx file."""
    path = Path(model)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ModelError(f"{path}: no such ONNX file")
        return path.stem, path
    from quant.artifacts.export import export_model
    from quant.paths import DEFAULT_OUT_ROOT

    spec, graph = _shipped_graph(str(model))
    assert graph.exporter is not None
    target = DEFAULT_OUT_ROOT / "export" / graph.exporter / str(graph.export_file)
    if not target.is_file():
        export_model(graph.exporter, target.parent)
    return graph.name, target


def _shipped_graph(name: str) -> tuple[Any, Any]:
    """(spec, graph) of the shipped spec graph whose artifact name is `name`."""
    from quant.spec import load_spec, shipped_specs

    for spec in map(load_spec, shipped_specs()):
        for graph in spec.graphs:
            if graph.name == name and graph.exporter:
                return spec, graph
    raise ModelError(f"{name!r} is not a reference graph ({', '.join((*SE_MODELS, *ASR_MODELS))}) nor an .onnx file")


def _calibrated(name: str, source: Path) -> Path:
    """The calibration cache of a reference graph from the store (calibrated now on a key miss), as its spec says;
    an .onnx file of the user's needs --cache."""
    from quant.tasks.calibration import calibrate_spec

    if source.stem == name and source.suffix == ".onnx" and name not in (*SE_MODELS, *ASR_MODELS):
        raise ModelError(f"{source}: a search of a model quant does not know needs --cache from `quant calibrate`")
    spec, graph = _shipped_graph(name)
    return Path(calibrate_spec(spec, graph.role, source).path)


def _task_callables(name: str, fp32: Path, split: Split) -> tuple[Any, Any, Any, Feeds]:
    from quant.paths import calib_data_dir

    if name in ASR_MODELS:
        from quant.eval.asr import encoder_feeds, load_samples

        samples = load_samples(str(calib_data_dir() / "asr_test" / "manifest.jsonl"))
        validation, held = halves(samples, split)
        decoder = resolve_reference("wenet-decoder")[1]
        encoder_timing = encoder_feeds([validation[0].audio])
        return (AsrEvaluator(validation, decoder, fp32), AsrEvaluator(validation[:PROXY_UTTERANCES], decoder, fp32,
                                                                       task=False),
                AsrEvaluator(held, decoder, fp32), encoder_timing)
    from quant.eval import se

    streaming = SE_MODELS.get(name, False)
    pairs = se.load_pairs(str(calib_data_dir() / "se_test" / "manifest.jsonl"))
    validation, held = halves(pairs, split)
    noisy = validation[0][1]
    if streaming:
        runner = OrtRunner(fp32 / MODEL_FILE)
        frame = se.stft(se.stream_padded(noisy))[None, :, :1, :].astype(np.float32)
        feeds: Feeds = {se.MIX: np.ascontiguousarray(frame), **se.zero_states(runner)}
    else:
        feeds = {se.MIX: se.stft(se.segment(noisy)[:1]).astype(np.float32)}
    return (SeEvaluator(validation, streaming, fp32), SeEvaluator(validation[:PROXY_UTTERANCES], streaming, fp32,
                                                                  task=False),
            SeEvaluator(held, streaming, fp32), feeds)
