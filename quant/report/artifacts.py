"""What the report reads from the artifacts a results.json row names: the build's meta.json (precision plan by op type),
the precision rules' reasons, the calibration cache's sidecar ranges (amax by method, clipping) and the |x|
histograms stored beside the cache (quant.calib.histstore: clipped mass).

Every reader returns None when the artifact is gone or unreadable (a report of an old or moved run still renders);
the page says what was missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from quant.calib.histstore import StoredHistogram

from quant.errors import QuantError
from quant.report.rows import Row

logger = logging.getLogger(__name__)

META_FILE = "meta.json"  # quant.artifacts.artifact.META_FILE (not imported: that would load the build stack)


def build_meta(row: Row) -> dict[str, Any] | None:
    """The meta.json beside the row's first artifact (ORT and TensorRT builds have one; eager rows do not)."""
    artifacts = row.get("artifacts") or {}
    for path in artifacts.values():
        meta = _read_json(Path(path).parent / META_FILE)
        if meta is not None:
            return meta
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class PlanRow:
    op_type: str
    precision: str
    rule: str
    nodes: int
    reason: str


def precision_plan(meta: Mapping[str, Any], key: str = "plan") -> list[PlanRow]:
    """meta.json's plan summary (op type -> 'precision (rule)' -> node count) with each rule's reason ("why")."""
    reasons = rule_reasons(meta)
    out = []
    for op_type, counts in sorted((meta.get(key) or {}).items()):
        for decision, nodes in sorted(counts.items()):
            precision, _, rule = decision.partition(" (")
            rule = rule.rstrip(")")
            out.append(PlanRow(op_type, precision, rule, int(nodes), reasons.get(rule, _default_reason(meta, rule))))
    return out


def _default_reason(meta: Mapping[str, Any], rule: str) -> str:
    if rule == "default":
        return "no rule matched: the build's default precision (INT8 is opt-in per op type)"
    return ""


def rule_reasons(meta: Mapping[str, Any]) -> dict[str, str]:
    """rule name -> why, from the rules file the build recorded (the shipped rules when that file is gone)."""
    from quant.precision import load_rules

    recorded = (meta.get("rules") or {}).get("path")
    path = recorded if recorded and Path(recorded).is_file() else None
    try:
        return {rule.name: rule.why for rule in load_rules(path)}
    except QuantError as error:
        logger.warning("precision rules for the report: %s", error)
        return {}


@dataclass(frozen=True)
class TensorClip:
    """One tensor's calibration: amax per method, the largest |value| seen, and how much of that range amax clips."""

    name: str
    amax: Mapping[str, float]  # method -> amax
    observed: float  # max(|min|, |max|) over the calibration set
    method: str  # the method the build used
    histogram: StoredHistogram | None = None  # the |x| histogram the build's ranges came from, when stored

    @property
    def mass_clipped(self) -> float | None:
        """Share of the calibration values with |x| beyond the build's amax (None without a histogram)."""
        used = self.amax.get(self.method)
        if self.histogram is None or used is None:
            return None
        return self.histogram.share_above(used)

    @property
    def clipped(self) -> float:
        """Share of the observed range beyond the build's amax (0: nothing clipped)."""
        used = self.amax.get(self.method)
        if used is None or self.observed <= 0:
            return 0.0
        return max(0.0, 1.0 - used / self.observed)


@dataclass(frozen=True)
class Calibration:
    method: str
    cache: Path
    tensors: tuple[TensorClip, ...]  # most clipped first
    histogram_note: str = ""  # why there are no histograms ("" when they were read)

    @property
    def methods(self) -> list[str]:
        return sorted({m for t in self.tensors for m in t.amax})


def calibration(meta: Mapping[str, Any]) -> Calibration | None:
    """The build's cache sidecar ranges, joined with every other cache of the same model in the same store (other
    calibration methods), most clipped tensors first; None when the build used no cache or it is gone."""
    from quant.calib.cache import list_entries, read_entry
    from quant.calib.histstore import read_histograms

    path = (meta.get("cache") or {}).get("path")
    if not path or not Path(path).is_file():
        return None
    try:
        used = read_entry(path)
    except QuantError as error:
        logger.warning("calibration cache for the report: %s", error)
        return None
    by_method = {e.key.method: e for e in list_entries(Path(path).parent)
                 if e.key.model_sha256 == used.key.model_sha256 and e.key.method != used.key.method}
    by_method[used.key.method] = used
    stored = read_histograms(used.path, used.cache_sha256)
    tensors = []
    for name, item in used.ranges.items():
        amax = {method: float(entry.ranges[name].amax) for method, entry in by_method.items() if name in entry.ranges}
        observed = max(abs(float(item.minimum)), abs(float(item.maximum)))
        tensors.append(TensorClip(name, amax, observed, used.key.method, stored.tensors.get(name)))
    tensors.sort(key=lambda t: (-t.clipped, -(t.mass_clipped or 0.0), t.name))
    return Calibration(used.key.method, Path(path), tuple(tensors), stored.note)
