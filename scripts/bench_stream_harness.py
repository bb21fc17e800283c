"""What the timing harness adds to a streaming frame: the same ONNX builds rolled over the same real frames by three
loops, all timed round-robin in one process (ONNX Runtime, 1 thread, STREAM_ROUND_FRAMES frames per loop and build
per round), and the INT8/FP32 ratio each loop reports.

    python scripts/bench_stream_harness.py dpcrn-stream \\
        --build fp32=engines/dpcrn-stream/fp32/model.onnx --build int8=engines/dpcrn-stream/int8/model.onnx
    python scripts/bench_stream_harness.py SPEC.toml --build fp32=FP32.onnx --build int8=INT8.onnx --rounds 2000

The loops, each around one frame:
  runner   OrtRunner.run with numpy feeds (the input check, the feed and output dicts, the states copied into and out
           of ORT on every frame): what quant timed before the harness bound its tensors
  session  a bare InferenceSession.run(None, feeds) with numpy states (no check, no dicts of ours)
  bound    quant.eval.speed.stateful_step: tensors bound once (OrtRunner.bind, IOBinding), states ping-ponging inside
           ORT, the frame copied in before the clock starts: what quant times now

MODEL is a shipped model (its timing workload as `quant bench`) or a model spec file (its graph's speed workload:
--graph ROLE, default the first graph). The first --build is the base of the ratios (--base to choose another).
Before timing, the bound loop's outputs are checked against the runner loop's frame by frame (--check-frames).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.backends.ort import OrtRunner  # noqa: E402
from quant.errors import QuantError  # noqa: E402
from quant.eval.speed import STREAM_ROUND_FRAMES, GraphWorkload, Step, stateful_step, time_group  # noqa: E402

LOOPS = ("runner", "session", "bound")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a shipped streaming model (dpcrn-stream) or a model spec file (.toml)")
    parser.add_argument("--build", action="append", type=_build, required=True, metavar="LABEL=MODEL.onnx",
                        help="a build of the graph to time (repeat; the first is the ratios' base)")
    parser.add_argument("--base", help="the build label ratios divide by (default: the first --build)")
    parser.add_argument("--graph", help="with a spec file: the graph's role (default: the first graph)")
    parser.add_argument("--rounds", type=int, default=300, help=f"interleaved rounds of {STREAM_ROUND_FRAMES} frames")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per loop and build")
    parser.add_argument("--limit", type=int, default=8, help="utterances the workload is picked from")
    parser.add_argument("--check-frames", type=int, default=50, help="frames the bound loop is checked on")
    args = parser.parse_args(argv)
    builds = dict(args.build)
    base = args.base or next(iter(builds))
    if base not in builds:
        parser.error(f"--base {base!r} is not a --build label ({sorted(builds)})")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        workload = streaming_workload(args.model, args.graph, builds[base], args.limit)
        for label, path in builds.items():
            error = check_bound(path, workload, args.check_frames)
            print(f"{label}: bound loop vs runner loop over {args.check_frames} frames: max abs difference {error:.3g}")
        steps = {f"{label} {loop}": make_loop(loop, OrtRunner(path, threads=1), workload)
                 for label, path in builds.items() for loop in LOOPS}
        baselines = {f"vs {loop}": f"{base} {loop}" for loop in LOOPS}
        timed = time_group(steps, args.rounds, args.warmup * STREAM_ROUND_FRAMES, STREAM_ROUND_FRAMES, baselines)
    except QuantError as error:
        print(f"bench_stream_harness: error: {error}", file=sys.stderr)
        return 2
    print(format_table(timed, list(builds), base, workload.unit))
    return 0


def streaming_workload(model: str, role: str | None, fp32: Path, limit: int) -> GraphWorkload:
    """The frames and initial states quant times this graph on (the task's speed workload)."""
    if not model.endswith(".toml"):
        from quant.timing import timing_workload

        workload = timing_workload(model, fp32, limit)
    else:
        from quant.spec import load_spec
        from quant.tasks import FeedOptions, task_for

        spec = load_spec(Path(model))
        graph_role = role or spec.graphs[0].role
        workload = task_for(spec).speed_workload(graph_role, options=FeedOptions(graphs={graph_role: fp32},
                                                                                 limit=limit))
    if not workload.streaming:
        raise SystemExit(f"bench_stream_harness: {model} is not a streaming graph (its workload has no states)")
    return workload


def make_loop(loop: str, runner: OrtRunner, workload: GraphWorkload) -> Step:
    """One frame of `loop` (LOOPS) on the next real frame, its own states carried from output to input."""
    states = dict(workload.states or {})
    if loop == "bound":
        return stateful_step(runner, workload.frames, states, workload.frame_input, workload.state_outputs)
    frames = itertools.cycle(workload.frames)
    carried = {name: workload.state_outputs[name] for name in states}
    if loop == "runner":
        def runner_step() -> float:
            nonlocal states
            feeds = {workload.frame_input: next(frames), **states}
            start = time.perf_counter()
            outputs = runner.run(feeds)
            elapsed = time.perf_counter() - start
            states = {name: outputs[output] for name, output in carried.items()}
            return elapsed
        return runner_step
    session = runner.session
    names = [output.name for output in session.get_outputs()]
    index = {name: names.index(output) for name, output in carried.items()}

    def session_step() -> float:
        nonlocal states
        feeds = {workload.frame_input: next(frames), **states}
        start = time.perf_counter()
        values = session.run(None, feeds)
        elapsed = time.perf_counter() - start
        states = {name: values[i] for name, i in index.items()}
        return elapsed
    return session_step


def check_bound(path: Path, workload: GraphWorkload, frames: int) -> float:
    """Max abs difference of every output, frame by frame, between the bound loop and OrtRunner.run's loop."""
    runner = OrtRunner(path, threads=1)
    states = dict(workload.states or {})
    carried = {name: workload.state_outputs[name] for name in states}
    bound = runner.bind({workload.frame_input: workload.frames[0], **states}, carried)
    worst = 0.0
    for frame in [workload.frames[i % len(workload.frames)] for i in range(frames)]:
        expected = runner.run({workload.frame_input: frame, **states})
        states = {name: expected[output] for name, output in carried.items()}
        bound.set_input(workload.frame_input, frame)
        bound.run()
        got = bound.outputs()
        worst = max([worst, *(float(np.max(np.abs(got[name] - value), initial=0.0))
                              for name, value in expected.items())])
    return worst


def format_table(timed: Mapping[str, tuple[Any, dict[str, Any]]], builds: list[str], base: str, unit: str) -> str:
    lines = [f"ms per {unit} (median, p10-p90 of frames), ratio = build / {base} within the same loop "
             "(median; paired per round: median, p10-p90)",
             f"{'loop':<9}{'build':<12}{'median ms':>10}{'p10-p90':>16}{'ratio':>8}{'paired (p10-p90)':>22}"]
    for loop in LOOPS:
        for label in builds:
            stats, extra = timed[f"{label} {loop}"]
            ratio = extra.get(f"vs {loop}")
            tail = (f"{ratio['median_ratio']:>8.3f}{ratio['paired_median']:>9.3f} ({ratio['paired_p10']:.3f}-"
                    f"{ratio['paired_p90']:.3f})" if ratio else f"{'(base)':>8}")
            spread = f"{stats.p10_ms:.4f}-{stats.p90_ms:.4f}"
            lines.append(f"{loop:<9}{label:<12}{stats.p50_ms:>10.4f}{spread:>16}{tail}")
    for label in builds:
        medians = {loop: timed[f"{label} {loop}"][0].p50_ms for loop in LOOPS}
        lines.append(f"{label}: per-frame cost over the bound loop: runner +{medians['runner'] - medians['bound']:.4f}"
                     f" ms, session +{medians['session'] - medians['bound']:.4f} ms")
    info = next(iter(timed.values()))[1]["interleaved"]
    lines.append(f"{info['rounds']} interleaved rounds of {info['calls_per_round']} frames per loop and build; "
                 f"load average (1 min) before {info['load_before']:.2f}, after {info['load_after']:.2f}")
    return "\n".join(lines)


def _build(text: str) -> tuple[str, Path]:
    label, _, path = text.partition("=")
    if not label or " " in label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--build {text!r}: expected LABEL=MODEL.onnx of an existing file")
    return label, Path(path)


if __name__ == "__main__":
    sys.exit(main())
