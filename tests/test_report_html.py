"""report.html: built from a small results.json plus real build/cache artifacts, checked as text and in headless
Chromium (Debian's chromium-headless-shell or chromium; scripts/setup_browser.sh installs it, .ci/run runs that)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quant import report
from quant.calib.cache import CacheKey, write_entry
from quant.calib.histogram import AbsHistogram
from quant.calib.histstore import write_histograms
from quant.calib.ranges import RangeResult, TensorRange
from quant.cli import main
from quant.data.audio import load_audio
from quant.report import artifacts, examples, figures
from quant.report.html import HtmlOptions, render_html

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium-headless-shell or chromium on PATH; run "
                                   "scripts/setup_browser.sh (as root) to install Debian's")
IDS = [f"{i}:se_{i:02d}.wav" for i in range(12)]


def latency(mean: float) -> dict[str, float]:
    return {"runs": 20, "min_ms": 0.8 * mean, "mean_ms": mean, "p50_ms": mean, "p90_ms": 1.1 * mean,
            "p99_ms": 1.3 * mean, "max_ms": 1.6 * mean}


def se_row(precision: str, pesq: float, mean: float, artifact: Path | None = None) -> dict[str, Any]:
    values = pesq + np.linspace(-0.3, 0.3, len(IDS))
    return {"model": "dpcrn", "backend": "ort", "precision": precision, "status": "ok", "error": None,
            "artifacts": {"dpcrn": str(artifact)} if artifact else {},
            "task": {"pesq_wb": pesq, "pesq_nb": pesq + 0.3, "stoi": 0.9, "si_sdr": 12.0, "noisy_pesq_wb": 1.9},
            "per_utterance": {"ids": IDS, "pesq_wb": [float(v) for v in values]},
            "speed": {"dpcrn": {"unit": "9 s segment", "threads": {"1": {"latency_ms": latency(mean), "rtf": 0.1}}}},
            "latency_ms": latency(mean), "rtf": mean / 9000, "error_vs_fp32": {}}


def histogram_of(tensor: TensorRange) -> AbsHistogram:
    """1000 values: 95 % near zero, the rest spread up to the tensor's largest |x| (a heavy tail to clip)."""
    largest = max(-tensor.minimum, tensor.maximum)
    histogram = AbsHistogram(largest)
    rng = np.random.default_rng(0)
    histogram.add(np.concatenate([rng.uniform(0, largest / 20, 950), rng.uniform(0, largest, 49), [largest]]))
    return histogram


def int8_build(folder: Path) -> Path:
    """An int8 build folder as quant.artifacts leaves it: meta.json with the plan summary, rules file and cache."""
    cache = folder / "cache" / "dpcrn-percentile.cache"
    tensors = {"/enc/conv_out": TensorRange("/enc/conv_out", 2.0, -10.0, 8.0, 1000, 0),
               "/dec/add_out": TensorRange("/dec/add_out", 3.9, -4.0, 1.0, 1000, 0)}
    for method, scale in (("percentile", 1.0), ("minmax", None)):
        amax = {name: (t.amax if scale else max(-t.minimum, t.maximum)) for name, t in tensors.items()}
        ranges = {name: TensorRange(name, amax[name], t.minimum, t.maximum, t.count, 0) for name, t in tensors.items()}
        entry = write_entry(cache if method == "percentile" else folder / "cache" / "dpcrn-minmax.cache",
                            CacheKey.create("model-sha", "data-sha", method, {}), RangeResult(method, {}, ranges))
        if method == "percentile":  # as calibrate() keeps them: |x| of 1000 values up to the largest seen
            write_histograms(entry.path, entry.cache_sha256, {name: histogram_of(t) for name, t in tensors.items()})
    build = folder / "dpcrn" / "int8"
    build.mkdir(parents=True)
    artifact = build / "model.onnx"
    artifact.write_bytes(b"not a model: the report reads meta.json only")
    meta = {"backend": "ort", "precision": "int8", "source_sha256": "model-sha", "cache": {"path": str(cache)},
            "plan": {"Conv": {"fp32 (input-layer)": 1, "int8 (int8-compute)": 4}, "Shape": {"fp32 (default)": 3}}}
    (build / "meta.json").write_text(json.dumps(meta))
    return artifact


@pytest.fixture()
def results(tmp_path: Path) -> dict[str, Any]:
    failed = {"model": "wenet", "backend": "ort", "precision": "int8", "status": "failed",
              "error": "BuildError: encoder.onnx: <no> ranges for tensor x"}
    return {"schema": 1, "command": "quant run --quick --models dpcrn", "created_utc": "2026-01-01T00:00:00Z",
            "environment": {"cpu": "Test CPU", "cores": 2, "onnxruntime": "1.0"}, "backends": ["ort"],
            "options": {"bench": {"threads": [1, 2]}, "eval_threads": 2},
            "rows": [se_row("fp32", 3.0, 200.0), se_row("int8", 2.98, 110.0, int8_build(tmp_path / "engines")),
                     failed]}


class Page(HTMLParser):
    """Tags, images, links, and whether every opened element closed (void elements aside)."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.tags: dict[str, int] = {}
        self.images: list[dict[str, str | None]] = []
        self.links: list[str | None] = []  # every src and href
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs))
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)


def test_page_is_self_contained_and_well_formed(results: dict[str, Any]) -> None:
    text = render_html(results, HtmlOptions(examples=False))
    page = Page(text)
    assert not page.mismatched and not page.open
    assert not re.search(r"(?i)\b(https?|ftp|wss?):", text), "a URL would need the network"
    assert all(str(value).startswith(("data:", "#")) for value in page.links), page.links
    assert "Content-Security-Policy" in text and "<script" not in text
    assert page.images and all(str(img["src"]).startswith("data:image/png;base64,") for img in page.images)
    assert all(img.get("alt") for img in page.images)
    assert page.tags["table"] >= 4  # results, change vs FP32, plan, calibration, goals, environment
    assert "BuildError: encoder.onnx: &lt;no&gt; ranges for tensor x" in text  # failed row, escaped
    assert "Test CPU" in text and "quant run --quick --models dpcrn" in text


def test_plan_and_calibration_come_from_the_artifacts(results: dict[str, Any]) -> None:
    text = render_html(results, HtmlOptions(examples=False))
    assert "input-layer" in text and "int8-compute" in text  # the rules that decided, with their reasons
    assert "the first compute layer on the graph input" in text  # input-layer's why in precision_default.toml
    assert "Shape 3 (fp32)" in text  # no rule matched: listed, not tabled
    calibration = text[text.index("<h3>Calibration"):]
    # /enc/conv_out: |x| up to 10, percentile amax 2 -> 80 % of the range clipped, listed before /dec/add_out (2.5 %)
    assert calibration.index("/enc/conv_out") < calibration.index("/dec/add_out")
    assert "80.0 %" in calibration and "2.5 %" in calibration
    assert "amax minmax" in calibration and "amax percentile" in calibration  # both caches of the model's store
    # the stored histograms: share of values beyond amax, and their figure
    assert "values clipped (percentile)" in calibration and "histograms of the most clipped tensors" in calibration
    stored = artifacts.calibration(artifacts.build_meta(results["rows"][1]) or {})
    assert stored is not None and stored.histogram_note == ""
    conv = next(t for t in stored.tensors if t.name == "/enc/conv_out")
    assert conv.histogram is not None and 0.0 < (conv.mass_clipped or 0.0) < 0.06  # 2 of 10 -> 4 % of the tail
    assert f"{100 * (conv.mass_clipped or 0.0):.3g} %" in calibration


def test_calibration_notes_missing_histograms(results: dict[str, Any], tmp_path: Path) -> None:
    for stored in (tmp_path / "engines" / "cache").glob("*.hist.npz"):
        stored.unlink()
    calibration = render_html(results, HtmlOptions(examples=False)).split("<h3>Calibration")[1]
    assert "no histograms stored for dpcrn-percentile.cache" in calibration
    assert "histograms of the most clipped tensors" not in calibration


def searched(folder: Path) -> dict[str, Any]:
    """The "search" key as `quant run` takes it from a `quant search` output (tests/test_report_search.py)."""
    from quant.report.search import search_section
    from tests.test_report_search import write_search_json

    return {"dpcrn": search_section(write_search_json(folder / "search" / "dpcrn"))}


def test_optional_sections_follow_their_keys(results: dict[str, Any], tmp_path: Path) -> None:
    plain = render_html(results, HtmlOptions(examples=False))
    assert "Time per op type" not in plain and "Sensitivity" not in plain and "frontier" not in plain
    results["rows"][0]["profile"] = {"Conv": 120.0, "LSTM": 60.0}
    results["rows"][1]["profile"] = {"QLinearConv": 40.0, "DynamicQuantizeLSTM": 45.0, "Conv": 5.0}
    results["search"] = searched(tmp_path)
    full = render_html(results, HtmlOptions(examples=False))
    assert "Time per op type" in full and "QLinearConv" in full and "Sensitivity of each quantized unit" in full
    assert "frontier" in full and "Precision search" in full
    assert Page(full).tags["img"] > Page(plain).tags["img"]


def test_example_is_skipped_with_a_note_when_artifacts_are_gone(results: dict[str, Any]) -> None:
    text = render_html(results, HtmlOptions(examples=True))
    assert "no ONNX Runtime fp32 artifact of dpcrn on this machine" in text
    assert examples.enhanced_example("wenet", results["rows"]) == "wenet is not a speech-enhancement model"


def test_spectrograms_of_real_audio() -> None:
    audio = load_audio(Path(__file__).parent / "data" / "librivox_0870.flac")[: 16000 * 2]
    example = examples.Example("dpcrn", "librivox_0870", 16000, (("noisy input", audio), ("ORT INT8", 0.5 * audio)))
    png = figures.spectrograms(example)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_quant_report_regenerates_every_file(results: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    source = report.write_results(results, tmp_path / "run", report.HtmlOptions(examples=False))["json"]
    assert main(["report", str(source), "-o", str(tmp_path / "again"), "--no-examples"]) == 0
    written = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert written == ["report.html", "results.csv", "results.md", "tradeoff.png"]
    assert "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def chromium(*args: str, page: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a local page; --enable-logging=stderr puts the page's console messages (CSP violations,
    failed loads, script errors) on stderr as CONSOLE lines."""
    command = [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


IMAGE_CHECK = """<script>window.addEventListener("load", () => {
  const pre = document.createElement("pre"); pre.id = "image-check";
  pre.textContent = JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth]));
  document.body.append(pre); });</script>"""


@needs_browser
def test_page_renders_in_headless_chromium(results: dict[str, Any], tmp_path: Path) -> None:
    results["search"] = searched(tmp_path)
    page = report.write_results(results, tmp_path / "run", report.HtmlOptions(examples=False))["html"]
    text = page.read_text(encoding="utf-8")
    for alt in ("most clipped tensors", "histograms of the most clipped tensors", "searched configurations",
                "unit sensitivity"):
        assert f'alt="dpcrn {alt}"' in text
    assert_renders(page, tmp_path, images=6)  # trade-off, latency, clipping, histograms, frontier, sensitivity


@needs_browser
def test_search_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    from quant.report.search import write_search_report
    from tests.test_report_search import write_search_json

    written = write_search_report("dpcrn", "dpcrn", write_search_json(tmp_path / "dpcrn"), tmp_path / "dpcrn")
    assert_renders(written["html"], tmp_path, images=2, height=1200)


def assert_renders(page: Path, tmp_path: Path, images: int, height: int = 1600) -> None:
    """In a narrow headless Chromium window: no console message, not blank, every image loaded, every table there."""
    from PIL import Image

    shot = tmp_path / "shot.png"
    run = chromium(f"--screenshot={shot}", f"--window-size=600,{height}", page=page)  # a narrow window
    assert console_lines(run.stderr) == []  # no CSP violation (a request), no error of any kind
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (height, 600) and pixels.std() > 20  # not blank: text, tables and figures
    # The same page with one inline script (allowed by a relaxed policy) that lists every image's load state.
    text = page.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src "
                                  "'unsafe-inline'").replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = chromium("--dump-dom", page=probe)
    assert console_lines(dom.stderr) == []
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout)
    assert found, "the image check did not run"
    states = json.loads(found.group(1))
    assert len(states) == len(Page(text).images) >= images
    assert all(complete and width > 0 for complete, width in states), states  # no broken image
    assert dom.stdout.count("<table") == text.count("<table")


@needs_browser
def test_browser_check_catches_a_request_and_a_broken_image(tmp_path: Path) -> None:
    """The checks above can fail: a page with an outside image logs a CSP violation and its image has no size."""
    page = tmp_path / "bad.html"
    text = render_html({"rows": []}, HtmlOptions(examples=False))
    page.write_text(text.replace("</body>", '<img src="http://192.0.2.1/x.png" alt="x"></body>'), encoding="utf-8")
    run = chromium("--dump-dom", page=page)
    assert any("Content Security Policy" in line for line in console_lines(run.stderr))


@pytest.mark.slow
def test_example_of_a_users_se_model_runs_through_its_spec(third_party_model) -> None:
    """The SE example is enhanced by the model's own spec (front end, output, chain), named by the rows: a user's
    log-power GRU masker gets spectrograms like the reference DPCRN (it used to be DPCRN-only)."""
    spec_file = third_party_model("gru-logpower").specs[13]
    onnx_file = spec_file.parent / "models" / "gru_logpower.onnx"
    rows = [{"model": "gru-logpower", "kind": "se", "backend": "ort", "precision": precision, "status": "ok",
             "spec": str(spec_file), "artifacts": {onnx_file.stem: str(onnx_file)}} for precision in ("fp32", "int8")]
    found = examples.enhanced_example("gru-logpower", rows)
    assert isinstance(found, examples.Example), found
    labels = [label for label, _ in found.signals]
    assert labels == ["noisy input", "clean reference", "ORT FP32", "ORT INT8"]
    noisy, enhanced = found.signals[0][1], found.signals[2][1]
    assert enhanced.shape == noisy.shape and not np.allclose(enhanced, noisy)
    rows[0]["spec"] = None
    assert "no spec file" in examples.enhanced_example("gru-logpower", rows)
