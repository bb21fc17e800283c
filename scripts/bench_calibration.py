"""Entropy threshold search: quant's vectorized TensorRT-style search vs ONNX Runtime's, side by side in one run.

Histograms of real activations are collected once (real speech STFT from tests/data/librivox_*.flac through the
exported DPCRN when engines/export/dpcrn[/dpcrn].onnx exists or --model is given, else through a tiny random conv
model), then both searches run on them:

- ours: quant.calib.histogram.entropy_amax on the 2048-bin |x| histogram (TensorRT's algorithm).
- ORT (as configured): HistogramCollector.get_entropy_threshold with num_bins=2048, num_quantized_bins=128 on ORT's
  own signed histogram of the same activations (collected by ORT's HistogramCollector.collect).
- ORT (same histogram): ORT's search on OUR |x| histogram, mirrored into a signed 4096-bin histogram with 256
  quantized bins, so it scans the same candidate thresholds (bins 128..2048 of |x|) with 128 levels per side.

Threshold differences are given in bins of our histogram (amax / 2048). Times are wall-clock on this machine, measured
in the same process one after the other. --memory-segments N instead calibrates N segments of 9 s and reports the
peak RSS of the process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant import features  # noqa: E402
from quant.calib import histogram as hist  # noqa: E402
from quant.calib.ranges import RangeOptions, augment_model, collect_ranges, collect_statistics  # noqa: E402
from quant.data.audio import load_audio  # noqa: E402
from onnxruntime.quantization.quant_utils import smooth_distribution  # noqa: E402


def find_model(given: Path | None, tmp: Path) -> tuple[Path, str]:
    if given is not None:
        return given, "given"
    for candidate in (REPO / "engines/export/dpcrn/dpcrn.onnx", REPO / "engines/export/dpcrn.onnx"):
        if candidate.is_file():
            return candidate, "exported DPCRN"
    return tiny_conv_model(tmp / "tiny_conv.onnx"), "tiny random conv model (no DPCRN export found)"


def tiny_conv_model(path: Path) -> Path:
    """mix (B,257,T,2) -> Transpose -> Conv(2->16, (2,5), stride (1,2)) -> PRelu -> Conv(16->16, (1,3)) -> Tanh."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.normal(size=(16, 2, 2, 5)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array(np.full((16, 1, 1), 0.25, np.float32), "slope"),
        numpy_helper.from_array((rng.normal(size=(16, 16, 1, 3)) * 0.2).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Transpose", ["mix"], ["chw"], perm=[0, 3, 2, 1]),
        helper.make_node("Conv", ["chw", "w1", "b1"], ["conv1"], strides=[1, 2]),
        helper.make_node("PRelu", ["conv1", "slope"], ["act1"]),
        helper.make_node("Conv", ["act1", "w2"], ["conv2"]),
        helper.make_node("Tanh", ["conv2"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "tiny_conv",
                              [helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["B", 257, "T", 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def speech_segments(count: int, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """`count` 9 s STFT segments cut cyclically from the LibriVox test clips, in feeds of `batch`, made lazily."""
    speech = np.concatenate([load_audio(path) for path in sorted((REPO / "tests/data").glob("librivox_*.flac"))])
    for first in range(0, count, batch):
        spectra = []
        for i in range(first, min(first + batch, count)):
            start = (i * features.SEGMENT_SAMPLES // 3) % speech.size
            segment = np.resize(np.roll(speech, -start), features.SEGMENT_SAMPLES)
            spectra.append(features.stft(segment).astype(np.float32))
        yield {"mix": np.stack(spectra)}


def ort_histograms(model_path: Path, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, tuple]:
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import HistogramCollector

    augmented = augment_model(onnx.load(str(model_path)))
    exposed = augmented.fetched
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(augmented.model, f"{tmp}/augmented.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(f"{tmp}/augmented.onnx", options, providers=["CPUExecutionProvider"])
        collector = HistogramCollector("entropy", False, 2048, 128, 99.999, "same")
        for feed in feeds:
            outputs = dict(zip(exposed, session.run(exposed, feed)))
            with contextlib.redirect_stdout(io.StringIO()):
                collector.collect({name: outputs[augmented.aliases.get(name, name)] for name in names})
    return dict(collector.get_histogram_dict())


def ort_search_vectorized(histogram: tuple, num_quantized_bins: int) -> tuple[float, float]:  # type: ignore[type-arg]
    """ONNX Runtime's get_entropy_threshold, same arithmetic (int64 q, eps smoothing, float32 KL), numpy per candidate.

    Not quant's search: it is here to show what the vectorization costs and gains on ORT's own algorithm.
    """
    counts, edges = np.asarray(histogram[0]), histogram[1]
    num_bins = counts.size
    zero, half = num_bins // 2, num_quantized_bins // 2
    prefix = np.concatenate(([0], np.cumsum(counts)))
    total = prefix[-1]
    best, best_kl = (edges[0], edges[-1]), np.inf
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = counts[start:end]
        p = sliced.copy()
        p[0] += prefix[start]
        p[-1] += total - prefix[end]
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        levels = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1)
        levels[-1] += sliced[body:].sum()
        norms = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        filled = norms != 0
        per_bin = np.zeros(num_quantized_bins, dtype=np.int64)
        per_bin[filled] = (levels[filled] / norms[filled]).astype(np.int64)  # ORT stores into an int64 array
        q[:body] = np.repeat(per_bin, merged)
        kl = _ort_kl(smooth_distribution(p), smooth_distribution(q))
        if kl < best_kl:  # np.argmin: the first minimum wins
            best, best_kl = (edges[start], edges[end]), kl
    low, high = best
    return max(low, histogram[2]), min(high, histogram[3])


def _ort_kl(p: np.ndarray | None, q: np.ndarray | None) -> float:
    if p is None or q is None:
        return np.inf
    from onnxruntime.quantization.calibrate import entropy

    return float(np.float32(entropy(p, q)))


def mirrored(histogram: hist.AbsHistogram) -> tuple:
    """Our |x| counts as a symmetric signed histogram in ORT's layout (hist, edges, min, max, threshold)."""
    counts = np.concatenate([histogram.counts[::-1], histogram.counts])
    amax = np.float32(histogram.amax)
    edges = np.linspace(-amax, amax, counts.size + 1, dtype=np.float32)
    return counts, edges, -amax, amax, amax


def timed(function, items):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    results = [function(item) for item in items]
    return results, time.perf_counter() - start


def run_benchmark(args: argparse.Namespace) -> None:
    from onnxruntime.quantization.calibrate import HistogramCollector

    with tempfile.TemporaryDirectory() as tmp:
        model_path, origin = find_model(args.model, Path(tmp))
        feeds = list(speech_segments(args.segments, batch=1))
        print(f"model: {model_path} ({origin}); {args.segments} segments of 9 s real speech (LibriVox)")
        start = time.perf_counter()
        stats, _, _ = collect_statistics(model_path, feeds, True, RangeOptions(progress=False))
        print(f"histogram collection (1 pass, {len(stats)} tensors): {time.perf_counter() - start:.1f} s")
        usable = {name: hist.regrid(item.histogram, hist.NUM_BINS) for name, item in stats.items()
                  if item.histogram is not None and item.histogram.amax > 0}  # the 2048 bins the search reads
        augmented = augment_model(onnx.load(str(model_path)))  # ORT's collector sees fetched tensors (and aliases)
        names = [name for name in usable if augmented.aliases.get(name, name) in set(augmented.fetched)]
        picked = [names[int(i)] for i in np.linspace(0, len(names) - 1, min(args.max_tensors, len(names)))]
        ours_hist = {name: usable[name] for name in picked}
        ort_hist = ort_histograms(model_path, feeds, picked)

    ours, ours_s = timed(lambda name: hist.entropy_amax(ours_hist[name]), picked)
    collector = HistogramCollector("entropy", False, 2048, 128, 99.999, "same")
    ort_cfg, ort_cfg_s = timed(lambda name: collector.get_entropy_threshold(ort_hist[name], 128), picked)
    ort_same, ort_same_s = timed(lambda name: collector.get_entropy_threshold(mirrored(ours_hist[name]), 256),
                                 picked)
    ort_vec, ort_vec_s = timed(lambda name: ort_search_vectorized(ort_hist[name], 128), picked)
    report(picked, ours_hist, ours, ours_s, [("ORT as configured (2048 signed bins, 128 q)", ort_cfg, ort_cfg_s),
                                             ("ORT on our histogram (mirrored, 256 q)", ort_same, ort_same_s)])
    same = sum(abs(max(abs(float(a[0])), abs(float(a[1]))) - max(abs(float(b[0])), abs(float(b[1]))))
               <= ours_hist[name].bin_width for name, a, b in zip(picked, ort_cfg, ort_vec))
    print(f"\nORT's own algorithm, vectorized per candidate (scripts only): {ort_vec_s:.3f} s vs ORT {ort_cfg_s:.3f} s "
          f"({ort_cfg_s / ort_vec_s:.1f}x); same threshold within one bin for {same}/{len(picked)} tensors")


def report(names: list[str], histograms: dict, ours: list[float], ours_s: float, others: list) -> None:  # type: ignore[type-arg]
    count = len(names)
    print(f"\n{count} tensors; thresholds compared in bins of our histogram (amax / 2048)")
    print(f"{'search':<48} {'total s':>8} {'ms/tensor':>10} {'ours faster':>12} {'max diff':>9} {'<=1 bin':>8}")
    print(f"{'quant (vectorized TensorRT entropy)':<48} {ours_s:>8.3f} {1000 * ours_s / count:>10.1f}")
    for label, thresholds, seconds in others:
        diffs = [abs(max(abs(float(t[0])), abs(float(t[1]))) - mine) / histograms[name].bin_width
                 for name, t, mine in zip(names, thresholds, ours)]
        within = sum(d <= 1.0 for d in diffs)
        print(f"{label:<48} {seconds:>8.3f} {1000 * seconds / count:>10.1f} {seconds / ours_s:>11.1f}x "
              f"{max(diffs):>9.2f} {within:>4}/{count}")
    print("\nper tensor: amax ours | ORT configured | ORT same histogram (in bins)")
    for i, name in enumerate(names):
        row = [max(abs(float(t[0])), abs(float(t[1]))) / histograms[name].bin_width for _, ts, _ in others
               for t in [ts[i]]]
        print(f"  {name[:60]:<60} {ours[i] / histograms[name].bin_width:8.1f} | "
              + " | ".join(f"{value:8.1f}" for value in row))


def run_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_path, origin = find_model(args.model, Path(tmp))
        feeds = lambda: speech_segments(args.memory_segments, args.batch)  # noqa: E731 - fresh each pass
        start = time.perf_counter()
        result = collect_ranges(model_path, feeds, "entropy", RangeOptions(max_batch=args.max_batch))
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model: {model_path} ({origin})")
    print(f"entropy calibration of {args.memory_segments} segments of 9 s (feeds of {args.batch}, max_batch "
          f"{args.max_batch}): {len(result.tensors)} tensors, {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="ONNX model with a `mix` (B,257,T,2) input")
    parser.add_argument("--segments", type=int, default=4, help="9 s segments for the histograms (default 4)")
    parser.add_argument("--max-tensors", type=int, default=8, help="tensors to time (ORT's search is slow)")
    parser.add_argument("--memory-segments", type=int, help="instead: calibrate N segments, report peak RSS")
    parser.add_argument("--batch", type=int, default=4, help="segments per feed in --memory-segments mode")
    parser.add_argument("--max-batch", type=int, default=None, help="split feeds to this batch for inference")
    args = parser.parse_args()
    if args.memory_segments:
        run_memory(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
