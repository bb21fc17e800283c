"""Calibration feed sources: re-iterable objects whose iteration yields `{input_name: np.ndarray}` for one ONNX model.

Every source starts over on each `iter()`, so a source can be read more than once (the cache key's hash of the feeds,
then the range collector's pass).
The same source drives ONNX Runtime's CalibrationDataReader protocol (OrtCalibrationDataReader), the TensorRT
calibrator (TrtFeedSource) and quant.calib.ranges.

- OfflineSegmentReader: 9 s STFT segments of real speech, the tail zero-padded exactly as at inference, in batches.
- StreamingStateReader: any ONNX model whose recurrent states come back as outputs (`name` -> `name_out`, or an
  explicit mapping). It rolls the FP32 model frame by frame over each whole utterance, starting from zero states
  and resetting them at each utterance start, and yields (frame, the states the model really had at that frame).
  Zero states alone are WRONG for calibration: after the first frames a streaming model never sees zero states, so
  ranges from zero-state feeds miss the state tensors' real distribution and every layer reading them.
  `every=k` keeps every k-th frame (the roll itself still runs every frame) to bound the cost.
- FbankBatchReader: WeNet encoder feeds, Kaldi fbank batches padded to the longest utterance + int32 lengths.
- DecoderNbestReader: WeNet rescoring decoder feeds: the encoder's outputs plus the n-best of CTC prefix beam search
  on the same calibration audio, in the decoder's input layout.
- GenericReader: a third-party speech model: manifest audio, a feature choice (stft | fbank | waveform), an input name.

Every reader feeds what the model sees at inference: its audio comes from quant.data.manifest.model_input, the noisy
mixture of a speech-enhancement line and the speech of any other line; no reader chooses clean or noisy itself.
Every reader also states what shapes its feeds (key_settings(): reader kind, front end, batch size, frame stride,
state pairs, n-best settings, utterance count), which quant.calib.calibrate puts into the cache key, so two
calibrations on different feeds never share a key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from quant import features
from quant.errors import CalibrationError, ModelError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
FEATURES = ("stft", "fbank", "waveform")


# ------------------------------------------------------------------------------------------------ audio


STFT_FRONT_END = {"stft": {"sample_rate": features.SAMPLE_RATE, "n_fft": features.N_FFT, "hop": features.HOP,
                            "window": "sqrt-hann", "center": True}}
FBANK_FRONT_END = {"fbank": {"sample_rate": features.SAMPLE_RATE, "bins": features.FBANK_BINS,
                             "frame_ms": features.FBANK_FRAME_MS, "shift_ms": features.FBANK_SHIFT_MS,
                             "scale": features.FBANK_SCALE, "dither": 0.0, "snip_edges": True}}
FRONT_ENDS: Mapping[str, Mapping[str, Any]] = {"stft": STFT_FRONT_END, "fbank": FBANK_FRONT_END,
                                               "waveform": {"waveform": {"sample_rate": features.SAMPLE_RATE}}}


@dataclass(frozen=True)
class AudioSet:
    """A re-iterable list of utterances, loaded one at a time (never all in memory). `signal` says what `load`
    yields (part of the key): "model-input" for manifest sets (quant.data.manifest.model_input)."""

    items: tuple[Any, ...]
    load: Callable[[Any], np.ndarray]
    name: str = "audio"
    signal: str = "custom"

    def __iter__(self) -> Iterator[np.ndarray]:
        for item in self.items:
            yield self.load(item)

    def __len__(self) -> int:
        return len(self.items)

    def key_settings(self) -> dict[str, Any]:
        return {"signal": self.signal, "utterances": len(self.items)}

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> "AudioSet":
        from quant.data.audio import load_audio

        files = tuple(Path(p) for p in paths)
        return cls(files, load_audio, name=", ".join(p.name for p in files[:3]), signal="file")

    @classmethod
    def from_manifest(cls, manifest: str | Path, limit: int | None = None, allow_outside: bool = False
                      ) -> "AudioSet":
        """The first `limit` utterances of a manifest as the model sees them at inference (model_input: the noisy
        mixture of an SE line, else the speech)."""
        from quant.data import manifest as manifests

        utterances = tuple(manifests.read_manifest(manifest, allow_outside=allow_outside))[:limit]
        if not utterances:
            raise CalibrationError(f"{manifest}: manifest lists no utterances")
        return cls(utterances, manifests.model_input, name=str(manifest), signal="model-input")


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` consecutive items (the last one shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------ offline SE


def segments(audio: np.ndarray, segment_samples: int = features.SEGMENT_SAMPLES) -> list[np.ndarray]:
    """Cut into fixed-length segments, the last one zero-padded (as offline inference does)."""
    count = max(1, -(-len(audio) // segment_samples))
    padded = np.zeros(count * segment_samples, dtype=np.float32)
    padded[: len(audio)] = audio
    return list(padded.reshape(count, segment_samples))


@dataclass(frozen=True)
class OfflineSegmentReader:
    audio: AudioSet
    input_name: str = "mix"
    batch_size: int = 4
    segment_samples: int = features.SEGMENT_SAMPLES

    def __iter__(self) -> Iterator[Feed]:
        pieces = (seg for clip in self.audio for seg in segments(clip, self.segment_samples))
        for batch in batched(pieces, self.batch_size):
            yield {self.input_name: features.stft(np.stack(batch))}

    def key_settings(self) -> dict[str, Any]:
        return {"reader": "offline-segments", "input": self.input_name, "batch_size": self.batch_size,
                "segment_samples": self.segment_samples, **STFT_FRONT_END, "audio": self.audio.key_settings()}


# ------------------------------------------------------------------------------------------------ streaming


@dataclass(frozen=True)
class StreamingStateReader:
    """Roll the FP32 streaming model over whole utterances and yield the feeds it really saw (see module doc)."""

    onnx_path: Path
    audio: AudioSet
    states: tuple[tuple[str, str], ...] = ()  # (input, output) pairs; empty: name -> name_out by convention
    every: int = 1
    threads: int = 1

    def __iter__(self) -> Iterator[Feed]:
        from quant.backends.ort import OrtRunner
        from quant.onnxgraph.graph import state_pairs

        runner = OrtRunner(self.onnx_path, threads=self.threads)
        pairs = state_pairs(runner.input_names, runner.output_names, dict(self.states) if self.states else None)
        frame_input = _frame_input(self.onnx_path, runner.input_names, pairs)
        zero_states = _zero_states(self.onnx_path, runner.input_specs, pairs)
        for clip in self.audio:
            yield from self._roll(runner, frame_input, pairs, dict(zero_states), features.stft(clip))

    def key_settings(self) -> dict[str, Any]:
        """Explicit state pairs as given (empty: the name -> name_out convention, fixed by the model's sha256)."""
        return {"reader": "streaming-states", "states": [list(pair) for pair in self.states], "every": self.every,
                **STFT_FRONT_END, "audio": self.audio.key_settings()}

    def _roll(self, runner: Any, frame_input: str, pairs: Mapping[str, str], states: Feed,
              spec: np.ndarray) -> Iterator[Feed]:
        for t in range(spec.shape[1]):
            feed = {frame_input: np.ascontiguousarray(spec[None, :, t : t + 1, :]), **states}
            if t % self.every == 0:
                yield dict(feed)
            outputs = runner.run(feed, outputs=list(pairs.values()))
            states = {name: outputs[out] for name, out in pairs.items()}


def _frame_input(path: Path, inputs: Sequence[str], pairs: Mapping[str, str]) -> str:
    frames = [name for name in inputs if name not in pairs]
    if not pairs or len(frames) != 1:
        raise ModelError(f"{path}: a streaming model needs state inputs paired with outputs (name -> name_out) and "
                         f"exactly one frame input; found states {dict(pairs)} and other inputs {frames}")
    return frames[0]


def _zero_states(path: Path, specs: Sequence[Any], pairs: Mapping[str, str]) -> Feed:
    zeros = {}
    for spec in specs:
        if spec.name in pairs:
            if not all(isinstance(d, int) and d > 0 for d in spec.shape):
                raise ModelError(f"{path}: state {spec.name!r} has a non-fixed shape {list(spec.shape)}; "
                                 "export the streaming model with fixed state shapes")
            zeros[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
    return zeros


# ------------------------------------------------------------------------------------------------ ASR


# The WeNet encoder's Conv2dSubsampling4 (two 3x3 stride-2 convs, no padding) needs 7 fbank frames (85 ms) for one
# output frame; a shorter utterance alone in a batch makes ONNX Runtime fail inside the Conv.
WENET_MIN_FRAMES = 7


@dataclass(frozen=True)
class FbankBatchReader:
    """Utterances shorter than `min_frames` are skipped (a warning): the encoder gives them no frame to calibrate on."""

    audio: AudioSet
    batch_size: int = 4
    feature_name: str = "speech"
    length_name: str = "speech_lengths"
    min_frames: int = WENET_MIN_FRAMES

    def __iter__(self) -> Iterator[Feed]:
        batches = 0
        for batch in batched(self._long_enough(), self.batch_size):
            speech, lengths = features.pad_features(batch)
            batches += 1
            yield {self.feature_name: speech, self.length_name: lengths.astype(np.int32)}
        if batches == 0:
            raise CalibrationError(f"{self.audio.name}: every utterance is shorter than {self.min_frames} fbank frames "
                                   f"({features.FBANK_FRAME_MS + (self.min_frames - 1) * features.FBANK_SHIFT_MS:g} "
                                   "ms), the least the encoder turns into one frame; calibrate on longer speech")

    def _long_enough(self) -> Iterator[np.ndarray]:
        skipped = 0
        for clip in self.audio:
            frames = features.fbank(clip)
            if len(frames) >= self.min_frames:
                yield frames
            else:
                skipped += 1
        if skipped:
            log.warning("%s: skipped %d of %d utterances shorter than %d fbank frames", self.audio.name, skipped,
                        len(self.audio), self.min_frames)

    def key_settings(self) -> dict[str, Any]:
        return {"reader": "fbank-batches", "inputs": [self.feature_name, self.length_name],
                "batch_size": self.batch_size, **FBANK_FRONT_END, "audio": self.audio.key_settings()}


@dataclass(frozen=True)
class DecoderNbestReader:
    """Decoder feeds from the FP32 encoder run on the calibration audio and CTC prefix beam search."""

    encoder_path: Path
    decoder_inputs: tuple[str, ...]
    audio: AudioSet
    batch_size: int = 4
    beam: int = 10
    threads: int = 1

    def __iter__(self) -> Iterator[Feed]:
        from quant.backends.ort import OrtRunner

        encoder = OrtRunner(self.encoder_path, threads=self.threads)
        for feed in FbankBatchReader(self.audio, self.batch_size):
            encoded = encoder.run(feed)
            yield self._decoder_feed(encoded)

    def key_settings(self) -> dict[str, Any]:
        """The encoder's sha256 too: its outputs and vocabulary (sos/eos = its last id) are half of every feed."""
        from quant.fileio import sha256_file

        try:
            encoder = sha256_file(self.encoder_path)
        except OSError as error:
            raise ModelError(f"{self.encoder_path}: cannot read the encoder the decoder is calibrated with: "
                             f"{error.strerror}") from None
        return {"reader": "decoder-nbest", "inputs": list(self.decoder_inputs), "batch_size": self.batch_size,
                "beam": self.beam, "encoder_sha256": encoder, "sos_eos": "last vocabulary id", **FBANK_FRONT_END,
                "audio": self.audio.key_settings()}

    def _decoder_feed(self, encoded: Mapping[str, np.ndarray]) -> Feed:
        from quant.decoding import ctc_prefix_beam_search, hyps_to_decoder_inputs

        log_probs, lengths = encoded["ctc_log_probs"], encoded["encoder_out_lens"]
        nbests = [ctc_prefix_beam_search(log_probs[b], int(lengths[b]), self.beam) for b in range(len(lengths))]
        sos_eos = log_probs.shape[-1] - 1
        feed = {"encoder_out": encoded["encoder_out"], "encoder_out_lens": lengths.astype(np.int32),
                **hyps_to_decoder_inputs(nbests, sos_eos, self.beam).feeds()}
        missing = [name for name in self.decoder_inputs if name not in feed]
        if missing:
            raise ModelError(f"decoder inputs {missing} cannot be built from the encoder outputs and the n-best "
                             f"(available: {sorted(feed)})")
        return {name: feed[name] for name in self.decoder_inputs}


# ------------------------------------------------------------------------------------------------ generic


TIME_AXIS = {"stft": 2, "fbank": 1, "waveform": 1}  # where T (frames or samples) sits in each feature's layout
FEATURE_RANK = {"stft": 4, "fbank": 3, "waveform": 2}


@dataclass(frozen=True)
class GenericReader:
    """Feeds for any speech model taking one feature tensor: stft (B,257,T,2), fbank (B,T,80) or waveform
    (B,samples); utterances in a batch are zero-padded to the longest, and cut to `max_samples` when given.
    `time_steps`: a model input with a fixed T (e.g. the offline DPCRN's 563 frames) gets every feed zero-padded or
    cut to exactly that many steps; lengths are capped at it."""

    audio: AudioSet
    input_name: str
    feature: str = "waveform"
    batch_size: int = 1
    length_name: str | None = None
    max_samples: int | None = None
    time_steps: int | None = None

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise CalibrationError(f"feature {self.feature!r} is not one of {FEATURES}")

    def __iter__(self) -> Iterator[Feed]:
        for batch in batched((clip[: self.max_samples] for clip in self.audio), self.batch_size):
            yield self._feed(batch)

    def key_settings(self) -> dict[str, Any]:
        return {"reader": "generic", "input": self.input_name, "feature": self.feature, **FRONT_ENDS[self.feature],
                "batch_size": self.batch_size, "length_input": self.length_name, "max_samples": self.max_samples,
                "time_steps": self.time_steps, "audio": self.audio.key_settings()}

    def _feed(self, batch: list[np.ndarray]) -> Feed:
        if self.feature == "fbank":
            values, lengths = features.batch_fbank(batch)
        else:
            values, lengths = features.pad_features([clip[:, None] for clip in batch])
            values = values[..., 0]
            if self.feature == "stft":
                values = features.stft(values)
                lengths = np.array([features.frames_for(int(n)) for n in lengths], dtype=np.int32)
        if self.time_steps is not None:
            values = fit_time(values, TIME_AXIS[self.feature], self.time_steps)
            lengths = np.minimum(lengths, self.time_steps)
        feed = {self.input_name: np.ascontiguousarray(values, dtype=np.float32)}
        if self.length_name:
            feed[self.length_name] = lengths.astype(np.int32)
        return feed


def fit_time(values: np.ndarray, axis: int, steps: int) -> np.ndarray:
    """Zero-pad or cut `values` along `axis` to exactly `steps` (as offline inference pads its fixed segment)."""
    have = values.shape[axis]
    if have >= steps:
        return np.take(values, np.arange(steps), axis=axis)
    padding = [(0, 0)] * values.ndim
    padding[axis] = (0, steps - have)
    return np.pad(values, padding)


# ------------------------------------------------------------------------------------------------ adapters


class OrtCalibrationDataReader:
    """ONNX Runtime's CalibrationDataReader protocol (get_next() -> dict | None) over any feed source."""

    def __init__(self, source: Iterable[Feed]) -> None:
        self._source = source
        self._iterator: Iterator[Feed] | None = None

    def get_next(self) -> Feed | None:
        if self._iterator is None:
            self._iterator = iter(self._source)
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = None

    def __iter__(self) -> Iterator[Feed]:
        return iter(self._source)


@dataclass(frozen=True)
class TrtFeedSource:
    """What a TensorRT calibrator needs: a fixed batch size and, per batch, one contiguous array per input in the
    engine's input order. Feeds are regrouped along axis 0 into exactly `batch_size` rows; a remainder is dropped
    (TensorRT calibrates at one shape). Iterating yields the same batches as {input: array} feeds, which is what
    quant.backends.trt's calibrator takes. No tensorrt import here."""

    source: Iterable[Feed]
    input_order: tuple[str, ...]
    batch_size: int = 1

    def __iter__(self) -> Iterator[Feed]:
        for batch in self.batches():
            yield dict(zip(self.input_order, batch))

    def batches(self) -> Iterator[list[np.ndarray]]:
        pending: dict[str, list[np.ndarray]] = {name: [] for name in self.input_order}
        rows = 0
        for feed in self.source:
            self._check(feed)
            for name in self.input_order:
                pending[name].append(feed[name])
            rows += len(feed[self.input_order[0]])
            while rows >= self.batch_size:
                yield self._take(pending)
                rows -= self.batch_size
        if rows:
            log.info("TensorRT calibration: %d rows left over after full batches of %d were dropped", rows,
                     self.batch_size)

    def _check(self, feed: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self.input_order if name not in feed]
        if missing:
            raise CalibrationError(f"calibration feed lacks engine inputs {missing}; it has {sorted(feed)}")

    def _take(self, pending: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
        batch = []
        for name in self.input_order:
            joined = np.concatenate(pending[name], axis=0)
            batch.append(np.ascontiguousarray(joined[: self.batch_size]))
            pending[name] = [joined[self.batch_size :]] if len(joined) > self.batch_size else []
        return batch


# ------------------------------------------------------------------------------------------------ choice


@dataclass(frozen=True)
class ReaderOptions:
    batch_size: int = 4
    every: int = 4  # streaming: keep every k-th frame
    limit: int | None = None  # first N utterances of the manifest
    feature: str | None = None  # generic models
    input_name: str | None = None
    length_name: str | None = None
    states: tuple[tuple[str, str], ...] = ()
    allow_outside: bool = False  # manifest paths may leave the manifest's folder (absolute, `..`)

    def __post_init__(self) -> None:  # limit 0 must not mean "all" nor -1 "all but the last"
        for name in ("batch_size", "every", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CalibrationError(f"ReaderOptions: {name} must be at least 1, got {value}")


def reader_for(onnx_path: str | Path, manifest: str | Path, options: ReaderOptions | None = None) -> Iterable[Feed]:
    """The feed source for an ONNX file given without a model spec: a streaming model (states paired with outputs,
    by the `<name>_out` convention or options.states) rolled frame by frame, or, given options.feature (and
    options.input_name), any speech model fed that front end. Models with a spec get their feeds from quant.tasks."""
    return _generic_reader(Path(onnx_path), manifest, options or ReaderOptions())


def _audio(manifest: str | Path, opts: ReaderOptions) -> AudioSet:
    return AudioSet.from_manifest(manifest, opts.limit, opts.allow_outside)


def _generic_reader(path: Path, manifest: str | Path, opts: ReaderOptions) -> Iterable[Feed]:
    inputs = _input_names(path)
    if opts.feature is not None:
        input_name = opts.input_name or _only_input(path, inputs, opts.length_name)
        steps = fixed_time_steps(path, input_name, opts.feature)
        return GenericReader(_audio(manifest, opts), input_name, opts.feature, opts.batch_size, opts.length_name,
                             time_steps=steps)
    from quant.onnxgraph.graph import state_pairs

    outputs = _output_names(path)
    if state_pairs(inputs, outputs, dict(opts.states) if opts.states else None):
        return StreamingStateReader(path, _audio(manifest, opts), opts.states, opts.every)
    raise CalibrationError(f"{path}: not a streaming model; give a model spec (quant calibrate SPEC), or a feature "
                           f"({', '.join(FEATURES)}) and an input name (inputs: {inputs})")


def _only_input(path: Path, inputs: Sequence[str], length_name: str | None) -> str:
    candidates = [name for name in inputs if name != length_name]
    if len(candidates) != 1:
        raise CalibrationError(f"{path}: which input takes the feature? give --input-name (inputs: {list(inputs)})")
    return candidates[0]


def fixed_time_steps(path: Path, input_name: str, feature: str) -> int | None:
    """The fixed T of `input_name` in `feature`'s layout (None when that dimension is dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    value = next((v for v in graph.input if v.name == input_name), None)
    if value is None:
        raise CalibrationError(f"{path}: no input {input_name!r}; inputs: {list(_input_names(path))}")
    dims = value.type.tensor_type.shape.dim
    if not value.type.tensor_type.HasField("shape"):
        return None
    if len(dims) != FEATURE_RANK[feature]:
        raise CalibrationError(f"{path}: input {input_name!r} has rank {len(dims)}, but feature {feature!r} feeds "
                               f"rank {FEATURE_RANK[feature]} (stft (B,257,T,2), fbank (B,T,80), waveform "
                               "(B,samples)); choose the feature that matches the model")
    axis = TIME_AXIS[feature]
    steps = dims[axis].dim_value if dims[axis].HasField("dim_value") else 0
    return int(steps) if steps > 0 else None


def _input_names(path: Path) -> tuple[str, ...]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    return tuple(i.name for i in model.graph.input if i.name not in constants)


def _output_names(path: Path) -> tuple[str, ...]:
    import onnx

    return tuple(o.name for o in onnx.load(str(path), load_external_data=False).graph.output)
