"""Static against dynamic INT8 per weight MatMul, measured: for one shipped graph, build FP32, the shipped INT8
(weight MatMuls dynamic: rule linear-dynamic-ort, DynamicQuantizeMatMul) and the same INT8 with every weight MatMul
static (the shipped rules less linear-dynamic-ort: Q/DQ, fused by ORT into QLinearMatMul), all from one calibration
cache; profile the three alternately (ORT profiler, 1 thread) and attribute kernel time to each weight MatMul with
its bias Add (quant.search.speed.unit_times_ms: the node, its Q/DQ, the dynamic quantizer's `<node>_quant` kernels).
Where the profile says static is faster for some MatMuls but not all, `int8-best` pins those static. --isolate REGEX
cuts the matching MatMuls out of every build and times each alone, interleaved on its real FP32 input (a node's own
difference, which the whole graph's spread hides); then the whole builds are timed interleaved round-robin, with the
load average before and after.

    python scripts/bench_matmul_forms.py wenet-encoder --cache engines/cache/encoder-percentile-XXXX.cache \\
        --batch 8 --isolate 'blocks\\.0/' --json /tmp/forms.json
    python scripts/bench_matmul_forms.py dpcrn --cache engines/cache/dpcrn.deconv-...-percentile-XXXX.cache

The graph is the spec's build graph (its rewrites applied: quant.timing.build_graphs) and the cache must belong to it
(the cache file's .json sidecar names the model's sha256). --batch repeats the batch-1 timing input.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np
import onnx

from quant.artifacts import build_artifact
from quant.artifacts.artifact import MODEL_FILE
from quant.errors import QuantError
from quant.eval.profile import Feeds, profile_graphs
from quant.eval.speed import GraphWorkload
from quant.fileio import atomic_write_json
from quant.onnxgraph.graph import ensure_node_names, index_graph
from quant.onnxgraph.patterns import find_weight_matmul
from quant.precision import Rule, load_rules, without_rules
from quant.search.speed import unit_times_ms
from quant.search.units import Unit, write_rules
from quant.timing import build_graphs, format_interleaved, reference_graph, time_interleaved, timing_feeds, \
    timing_workload

DYNAMIC_RULE = "linear-dynamic-ort"


def matmul_units(model: onnx.ModelProto) -> tuple[Unit, ...]:
    """One unit per weight MatMul with its bias Add (a constant other input), where the MatMul's only consumer is one:
    the dynamic kernel fuses that Add, the static one runs it in float after DequantizeLinear."""
    index = index_graph(ensure_node_names(model))
    units = []
    for node in index.nodes:
        if node.name not in find_weight_matmul(index):
            continue
        consumers = index.consumers.get(node.output[0], ())
        bias = [c.name for c in consumers if len(consumers) == 1 and c.op_type == "Add"
                and any(index.is_constant(t) for t in c.input)]
        units.append(Unit(node.name, (node.name, *bias), ("MatMul", *(["Add"] if bias else [])), "int8", DYNAMIC_RULE))
    return tuple(units)


def static_rules(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """`rules` less linear-dynamic-ort: a weight MatMul falls through to int8-compute, static Q/DQ."""
    return tuple(r for r in rules if r.name != DYNAMIC_RULE)


def best_rules(rules: tuple[Rule, ...], static_nodes: list[str]) -> list[Rule]:
    """The shipped rules with the MatMuls whose static form profiled faster pinned static (before
    linear-dynamic-ort)."""
    pinned = [Rule(name=f"static:{node}", precision="int8", name_regex=f"^{re.escape(node)}$", builds=("int8",),
                   backends=("ort",), why="static INT8 profiled faster than dynamic") for node in static_nodes]
    return [*pinned, *rules]


def batched(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The batch-1 timing feeds repeated `batch` times along the batch axis (the WeNet encoder at batch 8)."""
    return {name: np.repeat(value, batch, axis=0) for name, value in feeds.items()}


def tensor_values(model_path: Path, feeds: dict[str, np.ndarray], names: list[str], folder: Path
                  ) -> dict[str, np.ndarray]:
    """The FP32 values of intermediate tensors on `feeds` (added as graph outputs of a copy saved in `folder`)."""
    from quant.backends.ort import OrtRunner

    model = onnx.load(str(model_path))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    path = folder / "with_outputs.onnx"
    onnx.save(model, str(path))
    outputs = OrtRunner(path).run(feeds)
    return {n: outputs[n] for n in names}


def isolated(unit: Unit, fp32_model: onnx.ModelProto, builds: dict[str, Path], feeds: dict[str, np.ndarray],
             folder: Path, rounds: int) -> dict[str, object]:
    """One unit cut out of every build (from the MatMul's float input to the unit's last output: the static form's
    Q, integer kernel, DQ and bias Add; the dynamic form's quantizer, kernel and rescale) and timed interleaved on
    its real FP32 input, so the node's own difference is not lost in the whole graph's spread."""
    by_name = {n.name: n for n in ensure_node_names(fp32_model).graph.node}
    first, last = by_name[unit.nodes[0]], by_name[unit.nodes[-1]]
    source, target = first.input[0], last.output[0]
    folder.mkdir(parents=True, exist_ok=True)
    value = tensor_values(builds["fp32"], feeds, [source], folder)
    cuts = {}
    for label, path in builds.items():
        cuts[label] = folder / f"{label}.onnx"
        onnx.utils.extract_model(str(path), str(cuts[label]), [source], [target], check_model=False)
    result = time_interleaved(cuts, value, rounds)
    print(f"\n-- {unit.name} alone ({' + '.join(unit.op_types)}, input {list(value[source].shape)})")
    print(format_interleaved(result, "fp32"))
    ratio = result.ratios("int8-dynamic")["int8-static"]
    print(f"static / dynamic: median {ratio.median_ratio:.3f}, paired {ratio.paired_median:.3f} "
          f"({ratio.paired_p10:.3f}-{ratio.paired_p90:.3f}){'' if ratio.reliable else ' (unreliable)'}")
    return {"unit": unit.name, "input_shape": list(value[source].shape), **result.to_dict("fp32"),
            "static_vs_dynamic": ratio.to_dict()}


def build_forms(source: Path, name: str, cache: Path, folder: Path, rules: tuple[Rule, ...]) -> dict[str, Path]:
    """FP32, INT8 under `rules` (the spec's shipped rules: weight MatMuls dynamic) and INT8 under the same rules less
    linear-dynamic-ort (weight MatMuls static), from one cache; model.onnx of each, by label."""
    files = {"int8-dynamic": write_rules(folder / "dynamic.toml", rules, "the spec's shipped rules"),
             "int8-static": write_rules(folder / "static.toml", static_rules(rules), "less " + DYNAMIC_RULE)}
    builds = {"fp32": build_artifact(source, "fp32", name=name, out_dir=folder / "fp32") / MODEL_FILE}
    for label, rules_file in files.items():
        builds[label] = build_artifact(source, "int8", name=name, out_dir=folder / label, cache=cache,
                                       rules=rules_file) / MODEL_FILE
    return builds


def profile_forms(builds: dict[str, Path], feeds: dict[str, np.ndarray], units: tuple[Unit, ...],
                  fp32_model: onnx.ModelProto, runs: int) -> tuple[dict[str, object], list[str]]:
    """Kernel ms per weight MatMul unit in each build (profiled alternately), printed as a table; and the MatMuls
    whose static form profiled faster."""
    labels = list(builds)
    profiles = dict(zip(labels, profile_graphs([builds[k] for k in labels], feeds, runs)))
    per_unit = {label: unit_times_ms({n.name: n.ms for n in p.nodes}, units, fp32_model)
                for label, p in profiles.items()}
    rows = {u.name: {label: per_unit[label][u.name] for label in labels} for u in units}
    sums = {label: sum(ms[label] for ms in rows.values()) for label in labels}
    rest = {label: profiles[label].node_ms - sums[label] for label in labels}
    static_faster = [name for name, ms in rows.items() if ms["int8-static"] < ms["int8-dynamic"]]
    print(f"{'node (median kernel ms, ' + str(runs) + ' profiled runs)':<60}{'fp32':>9}{'static':>9}{'dynamic':>9}")
    for name, ms in [*rows.items(), ("sum", sums), ("all other kernels", rest)]:
        print(f"{name:<60}{ms['fp32']:>9.3f}{ms['int8-static']:>9.3f}{ms['int8-dynamic']:>9.3f}")
    print("whole run (profiler, median ms): " + ", ".join(f"{k} {p.total_ms:.2f}" for k, p in profiles.items()))
    print(f"static profiled faster for {len(static_faster)} of {len(rows)}: {static_faster}")
    return {"profile_runs": runs, "per_matmul_ms": rows, "sum_ms": sums, "other_kernels_ms": rest,
            "static_faster": static_faster,
            "profiled_total_ms": {k: p.total_ms for k, p in profiles.items()}}, static_faster


def time_forms(builds: dict[str, Path], workload: Feeds | GraphWorkload, runs: int) -> dict[str, object]:
    """The whole builds timed interleaved; ratios against FP32 and against the shipped (dynamic) INT8."""
    result = time_interleaved(builds, workload, runs)
    print(format_interleaved(result, "fp32"))
    against_dynamic = {k: v for k, v in result.ratios("int8-dynamic").items() if k != "fp32"}
    for label, ratio in against_dynamic.items():
        print(f"{label} / int8-dynamic: median {ratio.median_ratio:.3f}, paired {ratio.paired_median:.3f} "
              f"({ratio.paired_p10:.3f}-{ratio.paired_p90:.3f}){'' if ratio.reliable else ' (unreliable)'}")
    return {"interleaved": result.to_dict("fp32"),
            "vs_int8_dynamic": {k: v.to_dict() for k, v in against_dynamic.items()}}


def bench(model: str, cache: Path, work: Path, runs: int, profile_runs: int, batch: int = 1,
          isolate: str = "", isolate_runs: int = 100) -> dict[str, object]:
    _spec, graph = reference_graph(model)
    source = build_graphs(model)[graph.role]
    shipped = without_rules(load_rules(), graph.rules_off)
    folder = work / f"{model}-b{batch}"
    builds = build_forms(source, str(graph.name), cache, folder, shipped)
    feeds = batched(timing_feeds(model, source), batch)
    fp32_model = onnx.load(str(source))
    units = matmul_units(fp32_model)
    print(f"\n== {model} batch {batch}: {len(units)} weight MatMuls")
    profiled, static_faster = profile_forms(builds, feeds, units, fp32_model, profile_runs)
    if 0 < len(static_faster) < len(units):
        best_file = write_rules(folder / "best.toml", best_rules(shipped, static_faster),
                                "shipped rules, static where the profile says faster")
        builds["int8-best"] = build_artifact(source, "int8", name=str(graph.name), out_dir=folder / "int8-best",
                                             cache=cache, rules=best_file) / MODEL_FILE
    alone = [isolated(u, fp32_model, builds, feeds, folder / "isolated" / re.sub(r"\W+", "_", u.name),
                      isolate_runs) for u in units if isolate and re.search(isolate, u.name)]
    workload = timing_workload(model, source) if batch == 1 else feeds  # a batch: the profiled feeds
    return {"model": model, "batch": batch, "source": str(source), "cache": str(cache), **profiled,
            "isolated": alone, **time_forms(builds, workload, runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a shipped graph: wenet-encoder, dpcrn, dpcrn-stream")
    parser.add_argument("--cache", type=Path, required=True, help="calibration cache of the spec's build graph")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--profile-runs", type=int, default=10, help="profiled runs per build (default 10)")
    parser.add_argument("--batch", type=int, default=1, help="the timing input repeated along the batch axis")
    parser.add_argument("--isolate", default="", metavar="REGEX",
                        help="also time the weight MatMuls whose name matches alone, cut out of each build")
    parser.add_argument("--isolate-runs", type=int, default=100, help="interleaved rounds of each cut-out MatMul")
    parser.add_argument("--work", type=Path, default=Path("engines/bench_matmul_forms"), help="builds go here")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = bench(args.model, args.cache, args.work, args.runs, args.profile_runs, args.batch,
                       args.isolate, args.isolate_runs)
    except QuantError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_json(args.json, {"command": " ".join(sys.argv), "result": result})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
