"""Range collection in shards through a quant.executor seam; the result equals quant.calib.ranges.collect_ranges.

Pass 1 runs per shard and returns each tensor's min/max/count accumulator: merged by min, max and integer sums, exact
in any order. The global amax then fixes every histogram's range, pass 2 runs per shard and returns integer bin
counts: summed, exact in any order. So the cache written from shards is byte-identical to the in-process one, on any
number of workers (tests/test_executor.py checks it).

What a worker gets (the choice per feed source):
- StreamingStateReader and GenericReader are re-built on the worker over a slice of the utterances (the picklable
  reader with a smaller AudioSet: manifest lines, audio read by path from shared storage). Streaming states restart at
  every utterance and a generic batch holds whole utterances (slices start at multiples of its batch size), so the
  slices' feeds are exactly the whole reader's feeds, cut in pieces. The expensive part (the FP32 roll of a streaming
  model, feature extraction) runs on the workers.
- Every other source (OfflineSegmentReader batches 9 s segments across utterances; FbankBatchReader pads a batch to
  its longest utterance and skips too-short ones; DecoderNbestReader; plain feed lists) cannot be cut by utterance
  without changing its feeds, so the driver iterates it once and ships consecutive feeds (FEEDS_PER_SHARD a shard)
  to the workers: the ONNX Runtime passes and histograms, the bulk of the work, still run there. Those feeds are
  held by the object store for both passes (about 1.2 MB per offline DPCRN segment).
The augmented model (every activation an output) travels once through the object store as bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from quant.calib import histogram as hist
from quant.calib.ranges import (Feed, FeedSource, RangeOptions, RangeResult, TensorStats, _load, _open, _run_pass,
                                _session, _tensor_range, augment_model, histograms_of, method_params)
from quant.errors import CalibrationError
from quant.executor import Executor, Shard, split
from quant.fileio import private_temp_dir

log = logging.getLogger(__name__)

# driver-made shards: a fixed number of feeds (each already a reader batch, e.g. 4 DPCRN segments), so the shards (and
# any error naming one) do not depend on the workers; one feed a shard keeps 2+ workers busy on small sets
FEEDS_PER_SHARD = 1
DEFAULT_SHARDS = 8  # reader shards: enough to keep a few workers busy, few enough that sessions are made rarely


@dataclass(frozen=True)
class ModelContext:
    """What every shard shares: the augmented model's bytes, the tensors to watch, the run options."""

    model: bytes
    names: tuple[str, ...]
    options: RangeOptions
    amax: tuple[float, ...] = ()  # pass 2: the global amax of each name


@dataclass(frozen=True)
class Pass1:
    stats: dict[str, hist.MinMaxAccumulator]
    batches: int
    covered: int  # utterances (reader shards) or feeds (driver shards) this shard ran


@dataclass(frozen=True)
class Pass2:
    counts: dict[str, np.ndarray]
    batches: int


def collect_ranges_sharded(onnx_path: str | Path, feeds: FeedSource, method: str, options: RangeOptions,
                           executor: Executor, shards: int = DEFAULT_SHARDS) -> RangeResult:
    """collect_ranges(onnx_path, feeds, method, options), its passes run as shards on `executor`."""
    params = method_params(method, options)
    augmented, names, skipped = augment_model(_load(onnx_path))
    context = ModelContext(augmented.SerializeToString(), tuple(names), replace(options, progress=False))
    parts = feed_shards(feeds, shards)
    expected = sum(len(part.covers) for part in parts)
    first = executor.map(run_pass1, parts, context)
    stats = {name: TensorStats(merge_minmax([result.stats[name] for result in first])) for name in names}
    batches = sum(result.batches for result in first)
    covered = sum(result.covered for result in first)
    if covered != expected:  # never a silently smaller set
        raise CalibrationError(f"{onnx_path}: the shards covered {covered} of {expected} utterances/feeds")
    if batches == 0:
        raise CalibrationError(f"no calibration feeds for {onnx_path}: the feed source yielded nothing")
    log.info("ranges pass 1 on %s: %d shards covering %d utterances or feeds, %d batches", executor.name, len(parts),
             covered, batches)
    if method != "minmax":
        amax = tuple(stats[name].minmax.amax for name in names)
        second = executor.map(run_pass2, parts, replace(context, amax=amax))
        for name, value in zip(names, amax):
            histogram = hist.AbsHistogram(value, options.num_bins)
            histogram.counts = np.sum([result.counts[name] for result in second], axis=0, dtype=np.int64)
            stats[name].histogram = histogram
    tensors = {name: _tensor_range(name, item, method, options) for name, item in stats.items()}
    return RangeResult(method, params, tensors, tuple(skipped), batches, histograms_of(stats))


def merge_minmax(parts: Sequence[hist.MinMaxAccumulator]) -> hist.MinMaxAccumulator:
    """One accumulator as if it had seen every part's values: min, max and integer sums (order independent)."""
    merged = hist.MinMaxAccumulator()
    for part in parts:
        merged.minimum = min(merged.minimum, part.minimum)
        merged.maximum = max(merged.maximum, part.maximum)
        merged.count += part.count
        merged.nonfinite += part.nonfinite
    return merged


# ------------------------------------------------------------------------------------------------ shards


def feed_shards(feeds: FeedSource, count: int, feeds_per_shard: int = FEEDS_PER_SHARD) -> list[Shard[Any]]:
    """Reader slices where the reader can be cut by utterance without changing its feeds, else the driver's feeds in
    consecutive groups (see the module doc)."""
    from quant.calib.readers import GenericReader, StreamingStateReader

    if isinstance(feeds, (StreamingStateReader, GenericReader)):
        unit = feeds.batch_size if isinstance(feeds, GenericReader) else 1
        items = feeds.audio.items
        return [Shard(index, replace(feeds, audio=replace(feeds.audio, items=tuple(items[part.start:part.stop]))),
                      tuple(_item_name(item) for item in items[part.start:part.stop]))
                for index, part in enumerate(split(items, count, unit))]
    log.info("calibration feeds are made here and shipped to the workers (%s cannot be cut by utterance exactly)",
             type(feeds).__name__)
    shards: list[Shard[Any]] = []
    group: list[Feed] = []
    number = 0
    for feed in _open(feeds, first=True):
        group.append(dict(feed))
        number += 1
        if len(group) == feeds_per_shard:
            shards.append(_feed_shard(len(shards), group, number))
            group = []
    if group:
        shards.append(_feed_shard(len(shards), group, number))
    return shards


def _feed_shard(index: int, group: list[Feed], last: int) -> Shard[Any]:
    first = last - len(group) + 1
    return Shard(index, tuple(group), tuple(f"feed {number}" for number in range(first, last + 1)))


def _item_name(item: Any) -> str:
    path = getattr(item, "path", item)
    return Path(path).name if isinstance(path, (str, Path)) else str(item)


# ------------------------------------------------------------------------------------------------ worker side


def run_pass1(shard: Shard[Any], context: ModelContext) -> Pass1:
    session = _cached_session(context)
    stats = {name: hist.MinMaxAccumulator() for name in context.names}
    batches = _run_pass(session, list(context.names), _shard_feeds(shard), context.options, "pass 1",
                        lambda name, value: stats[name].add(value))
    return Pass1(stats, batches, len(shard.covers))


def run_pass2(shard: Shard[Any], context: ModelContext) -> Pass2:
    session = _cached_session(context)
    histograms = {name: hist.AbsHistogram(amax, context.options.num_bins)
                  for name, amax in zip(context.names, context.amax)}
    batches = _run_pass(session, list(context.names), _shard_feeds(shard), context.options, "pass 2",
                        lambda name, value: histograms[name].add(value))
    return Pass2({name: item.counts for name, item in histograms.items()}, batches)


def _shard_feeds(shard: Shard[Any]) -> Iterable[Feed]:
    return shard.payload  # a reader slice or a tuple of feeds: both iterate to feed dicts


_SESSIONS: dict[str, Any] = {}  # per worker process: pass 2 (and further shards) reuse pass 1's session


def _cached_session(context: ModelContext) -> Any:
    import onnx

    digest = hashlib.sha256(context.model).hexdigest() + f"/{context.options.threads}"
    if digest not in _SESSIONS:
        _SESSIONS.clear()  # one model at a time: a worker process serving another stage drops the last one
        with private_temp_dir("quant-shard-") as tmp:
            _SESSIONS[digest] = _session(onnx.load_from_string(context.model), tmp, context.options.threads)
    return _SESSIONS[digest]
