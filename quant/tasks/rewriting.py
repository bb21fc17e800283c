"""The graphs of a model spec as its builds use them: each graph with the spec's exact rewrites (quant.rewrite)
applied and checked on real inputs, the task's calibration feeds. Every build (FP32, FP16, INT8), calibration and
FP32 reference starts from the same rewritten file, so the FP32 baseline is the rewritten graph too and a
calibration cache's key (the model's sha256) names the graph the build quantizes.

Lives on the tasks floor because the check feeds come from quant.tasks (the spec's front end, streaming roll and
chain wiring over the calibration manifest)."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from quant.rewrite import RewrittenGraph, rewrite_file
from quant.spec import ModelSpec, resolve_manifest
from quant.tasks import task_for
from quant.tasks.common import Feed, FeedOptions

log = logging.getLogger(__name__)

REWRITE_DIR = "rewrite"  # <out_root>/rewrite/<graph name>/<stem>.<rewrites>.onnx (+ .json record)


def graph_rewrites(spec: ModelSpec, role: str, override: Sequence[str] | None = None) -> tuple[str, ...]:
    """The rewrites of one graph: `override` (a build's --rewrites / --no-rewrites) when given, else the spec's."""
    return tuple(override) if override is not None else tuple(spec.graph(role).rewrites)


def rewrite_graphs(spec: ModelSpec, graphs: Mapping[str, Path], out_root: Path,
                   override: Sequence[str] | None = None,
                   feed_options: FeedOptions | None = None) -> dict[str, RewrittenGraph]:
    """Each graph of `graphs` (FP32 ONNX files by role) rewritten as the spec says (or `override` for every
    graph), written under out_root/rewrite/<graph name>/ and checked against the original on the first feeds of the
    task's calibration set; a graph with nothing to rewrite stays as it is."""
    feed_options = replace(feed_options or FeedOptions(), graphs={**dict(graphs)})
    done = {}
    for role, path in graphs.items():
        names = graph_rewrites(spec, role, override)
        folder = out_root / REWRITE_DIR / str(spec.graph(role).name)
        done[role] = rewrite_file(path, names, partial(_check_feeds, spec, role, feed_options), folder)
    return done


def _check_feeds(spec: ModelSpec, role: str, options: FeedOptions) -> Iterable[Feed]:
    """The task's calibration feeds of one graph (the FP32 originals run any roll or upstream graph)."""
    manifest = None if spec.feeds is not None else resolve_manifest(spec.defaults.calibration_manifest,
                                                                     "calibration manifest")
    return task_for(spec).calibration_feeds(role, str(manifest) if manifest is not None else None, options)
