"""Calibration of one graph of a model spec on its task's feeds: the spec-level entry to quant.calib.calibrate.

Lives on the tasks floor because the feeds come from quant.tasks (SE on the noisy mixtures, streaming states from
the FP32 roll, chains and ASR n-best from the FP32 upstream graphs); quant.calib itself knows nothing of specs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from quant.calib.cache import CacheEntry
from quant.calib.calibrate import CalibrateOptions, calibrate
from quant.calib.ranges import RangeOptions
from quant.executor import Executor
from quant.spec import ModelSpec, resolve_manifest
from quant.tasks import task_for
from quant.tasks.common import FeedOptions, fp32_path


@dataclass(frozen=True)
class SpecFeeds:
    """A spec's calibration feeds (quant.tasks) with what shapes them, for the cache key: the spec's tables that
    make feeds (front end, streaming, graphs' wiring, task, defaults) and the feed options."""

    feeds: Iterable[dict[str, np.ndarray]]
    settings: Mapping[str, Any]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def key_settings(self) -> dict[str, Any]:
        return dict(self.settings)


def calibrate_spec(spec: ModelSpec, role: str, onnx_path: str | Path | None = None,
                   manifest: str | Path | None = None, method: str | None = None,
                   out_cache: str | Path | None = None, options: CalibrateOptions | None = None,
                   feed_options: FeedOptions | None = None, feeds: Iterable[dict[str, np.ndarray]] | None = None,
                   executor: Executor | None = None) -> CacheEntry:
    """Calibrate graph `role` of a spec on its task's feeds (quant.tasks: SE on the noisy mixtures, streaming states
    from the FP32 roll, chains and ASR n-best from the FP32 upstream graphs) over `manifest` (default the spec's
    calibration manifest), with `method` (default the spec's), into the store under the graph's name (or
    `out_cache`). `feeds` replaces the task's feeds (the `--feeds` escape hatch); `executor` runs the range passes in
    shards (quant.executor; the cache is byte-identical)."""
    graph = spec.graph(role)
    feed_options = feed_options or FeedOptions()
    path = Path(onnx_path) if onnx_path is not None else fp32_path(spec, role, feed_options)
    feed_options = replace(feed_options, graphs={**feed_options.graphs, role: path})
    data = None if spec.feeds is not None or feeds is not None else Path(
        manifest if manifest is not None else resolve_manifest(spec.defaults.calibration_manifest,
                                                               "calibration manifest"))
    options = options or CalibrateOptions()
    options = replace(options, ranges=spec_range_options(spec, options.ranges),
                      allow_outside=options.allow_outside or feed_options.allow_outside)
    if feeds is None:
        given = manifest if manifest is not None else data  # the escape hatch's function may read the audio
        feeds = task_for(spec).calibration_feeds(role, str(given) if given is not None else None, feed_options)
    source = SpecFeeds(feeds, _spec_settings(spec, role, feed_options))
    return calibrate(path, graph.name, data, method or spec.method(graph), out_cache, options, feeds=source,
                     executor=executor)


def spec_range_options(spec: ModelSpec, options: RangeOptions) -> RangeOptions:
    """`options` as a spec's calibration runs them: batch-major inputs one item at a time (unless `max_batch` is
    set). The offline DPCRN exposes ~300 M activation values per 9 s segment, peak RSS 1.1 GB at batch 1 vs
    3.6 GB at batch 4 (scripts/bench_calibration.py --memory-segments); splitting never changes the ranges."""
    if spec.streaming is None and spec.frontend is not None and spec.frontend.axes.startswith("B") \
            and options.max_batch is None:
        return replace(options, max_batch=1)
    return options


def _spec_settings(spec: ModelSpec, role: str, options: FeedOptions) -> dict[str, Any]:
    """What shapes a spec's feeds, as JSON data: the spec without its paths and descriptions (the files are keyed
    by their sha256 apart), the role and the feed options."""
    table = spec.to_table()
    table.get("model", {}).pop("description", None)
    table.pop("defaults", None)
    for graph in table.get("graphs", []):
        graph.pop("path", None)
    return {"reader": "spec", "role": role, "spec": table, "limit": options.limit,
            "batch_size": options.batch_size or spec.defaults.batch_size,
            "frame_stride": options.frame_stride or spec.defaults.frame_stride}
