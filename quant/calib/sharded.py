"""Range collection in shards through a quant.executor seam; the result equals quant.calib.ranges.collect_ranges.

One pass runs per shard and returns each tensor's min/max/count accumulator and (entropy, percentile) its
power-of-two-range |x| histogram: accumulators merge by min, max and integer sums, histograms by growing to the
largest range (exact pairwise bin merges) and summing integer counts, all exact in any order. So the cache written
from shards is byte-identical to the in-process one, on any number of workers (tests/test_executor.py checks it).

What a worker gets (the choice per feed source):
- StreamingStateReader and GenericReader are re-built on the worker over a slice of the utterances (the picklable
  reader with a smaller AudioSet: manifest lines, audio read by path from shared storage). Streaming states restart at
  every utterance and a generic batch holds whole utterances (slices start at multiples of its batch size), so the
  slices' feeds are exactly the whole reader's feeds, cut in pieces. The expensive part (the FP32 roll of a streaming
  model, feature extraction) runs on the workers.
- Every other source (OfflineSegmentReader batches 9 s segments across utterances; FbankBatchReader pads a batch to
  its longest utterance and skips too-short ones; DecoderNbestReader; plain feed lists) cannot be cut by utterance
  without changing its feeds, so the driver iterates it once and ships consecutive feeds (FEEDS_PER_SHARD a shard)
  to the workers: the ONNX Runtime pass and histograms, the bulk of the work, still run there. Those feeds are
  held by the object store while the shards run (about 1.2 MB per offline DPCRN segment).
The augmented model (every activation an output) travels once through the object store as bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from quant.calib.ranges import (Feed, FeedSource, RangeOptions, RangeResult, TensorStats, _load, _open, _run_pass,
                                _session, augment_model, histograms_of, merge_stats, method_params, new_stats,
                                tensor_ranges, with_derived)
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
    histograms: bool


@dataclass(frozen=True)
class ShardStats:
    stats: dict[str, TensorStats]
    batches: int
    covered: int  # utterances (reader shards) or feeds (driver shards) this shard ran


def collect_ranges_sharded(onnx_path: str | Path, feeds: FeedSource, method: str, options: RangeOptions,
                           executor: Executor, shards: int = DEFAULT_SHARDS) -> RangeResult:
    """collect_ranges(onnx_path, feeds, method, options), its passes run as shards on `executor`."""
    params = method_params(method, options)
    augmented = augment_model(_load(onnx_path))
    names = augmented.fetched
    histograms = method != "minmax"
    context = ModelContext(augmented.model.SerializeToString(), tuple(names), replace(options, progress=False),
                           histograms)
    parts = feed_shards(feeds, shards)
    expected = sum(len(part.covers) for part in parts)
    results = executor.map(run_shard, parts, context)
    stats = {name: merge_stats([result.stats[name] for result in results], histograms, options) for name in names}
    batches = sum(result.batches for result in results)
    covered = sum(result.covered for result in results)
    if covered != expected:  # never a silently smaller set
        raise CalibrationError(f"{onnx_path}: the shards covered {covered} of {expected} utterances/feeds")
    if batches == 0:
        raise CalibrationError(f"no calibration feeds for {onnx_path}: the feed source yielded nothing")
    log.info("ranges on %s: %d shards covering %d utterances or feeds, %d batches", executor.name, len(parts),
             covered, batches)
    every = with_derived(stats, augmented, histograms, options)
    tensors = tensor_ranges(every, method, options)
    return RangeResult(method, params, tensors, tuple(augmented.skipped), batches, histograms_of(every, options))


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
    for feed in _open(feeds):
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


def run_shard(shard: Shard[Any], context: ModelContext) -> ShardStats:
    session = _cached_session(context)
    stats = {name: new_stats(context.histograms, context.options) for name in context.names}
    batches = _run_pass(session, list(context.names), _shard_feeds(shard), context.options, "shard",
                        lambda name, value: stats[name].add(value))
    for item in stats.values():  # nothing pending travels back
        item.flush()
    return ShardStats(stats, batches, len(shard.covers))


def _shard_feeds(shard: Shard[Any]) -> Iterable[Feed]:
    return shard.payload  # a reader slice or a tuple of feeds: both iterate to feed dicts


_SESSIONS: dict[str, Any] = {}  # per worker process: further shards reuse the first one's session


def _cached_session(context: ModelContext) -> Any:
    import onnx

    digest = hashlib.sha256(context.model).hexdigest() + f"/{context.options.threads}"
    if digest not in _SESSIONS:
        _SESSIONS.clear()  # one model at a time: a worker process serving another stage drops the last one
        with private_temp_dir("quant-shard-") as tmp:
            _SESSIONS[digest] = _session(onnx.load_from_string(context.model), tmp, context.options.threads)
    return _SESSIONS[digest]
