"""quant.timing on tiny graphs: compared ONNX files timed interleaved with the load recorded (no wall-clock
values asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.errors import ModelError
from quant.timing import format_interleaved, time_interleaved, timing_feeds


def matmul_model(path: Path, width: int) -> Path:
    w = numpy_helper.from_array(np.ones((8, width), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_time_interleaved_reports_every_build_its_ratio_and_the_load(tmp_path: Path):
    models = {"fp32": matmul_model(tmp_path / "a.onnx", 16), "wide": matmul_model(tmp_path / "b.onnx", 64)}
    result = time_interleaved(models, {"x": np.ones((4, 8), np.float32)}, runs=5, warmup=1)
    assert {label: len(values) for label, values in result.seconds.items()} == {"fp32": 5, "wide": 5}
    assert result.load_before >= 0 or np.isnan(result.load_before)
    ratio = result.ratios("fp32")["wide"]
    assert ratio.paired_p10 <= ratio.paired_median <= ratio.paired_p90
    data = result.to_dict("fp32")
    assert set(data["latency_ms"]) == {"fp32", "wide"} and set(data["ratios"]) == {"wide"}  # type: ignore[arg-type]
    text = format_interleaved(result, "fp32")
    assert "(base)" in text and "load average" in text


def test_timing_feeds_names_the_models_it_knows(tmp_path: Path):
    with pytest.raises(ModelError, match="bench_int8.py"):
        timing_feeds("not-a-model", tmp_path / "x.onnx")


@pytest.mark.parametrize("rewrites", [None, (), ("deconv-to-conv",)])
def test_profile_model_profiles_the_graph_the_builds_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         rewrites: tuple[str, ...] | None):
    """`quant bench --profile` builds, calibrates and profiles the spec's rewritten graph (it used to profile the
    plain export while every build started from the rewritten one); --rewrites/--no-rewrites override the spec."""
    from types import SimpleNamespace

    import quant.artifacts
    import quant.tasks.calibration
    import quant.tasks.rewriting
    from quant import timing

    export = tmp_path / "export" / "dpcrn.onnx"
    rewritten = tmp_path / "rewrite" / "dpcrn.rewritten.onnx"
    seen: dict[str, object] = {}

    def rewrite_graphs(spec: object, graphs: dict[str, Path], out_root: Path, override: object = None) -> object:
        seen["exports"], seen["override"] = dict(graphs), override
        return {role: SimpleNamespace(path=export if override == () else rewritten) for role in graphs}

    def build_artifact(source: Path, precision: str, **options: object) -> Path:
        folder = Path(str(options["out_dir"]))
        seen[f"build {folder.name}"] = source
        return folder

    def calibrate_spec(spec: object, role: str, path: Path, **options: object) -> object:
        seen["calibrated"] = path
        return SimpleNamespace(path=tmp_path / "calib.cache")

    monkeypatch.setattr(timing, "reference_export", lambda name, out_root=None: export)
    monkeypatch.setattr(quant.tasks.rewriting, "rewrite_graphs", rewrite_graphs)
    monkeypatch.setattr(quant.artifacts, "build_artifact", build_artifact)
    monkeypatch.setattr(quant.tasks.calibration, "calibrate_spec", calibrate_spec)
    monkeypatch.setattr(timing, "timing_feeds", lambda model, path: {})
    monkeypatch.setattr(timing, "profile_pair", lambda *args: "profiled")
    profiled = timing.profile_model("dpcrn", 2, 1, None, tmp_path / "out", rewrites)
    assert seen["exports"] == {"enhancer": export} and seen["override"] == rewrites
    built_from = export if rewrites == () else rewritten
    assert seen["build fp32"] == seen["build int8"] == seen["calibrated"] == built_from == profiled.source
    # the export as it is also gets an FP32 build, timed beside them (the faster FP32 is the base), where rewritten
    assert profiled.plain_fp32 == (None if rewrites == () else tmp_path / "out" / "fp32-plain" / "model.onnx")
    assert seen.get("build fp32-plain") == (None if rewrites == () else export)


@pytest.mark.parametrize("flags, expected", [([], None), (["--no-rewrites"], ()),
                                             (["--rewrites", "deconv-to-conv"], ("deconv-to-conv",))])
def test_bench_profile_honours_the_rewrite_flags(monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                 expected: tuple[str, ...] | None):
    from quant import timing
    from quant.cli import main

    seen: list[object] = []

    def stop(model: str, runs: int, threads: int, cache: object, out_dir: object, rewrites: object) -> None:
        seen.append(rewrites)
        raise ModelError("stopped here")

    monkeypatch.setattr(timing, "profile_model", stop)
    assert main(["bench", "dpcrn", "--profile", *flags]) == 2
    assert seen == [expected]


def stream_model(path: Path) -> Path:
    """A streaming graph: y = x + state, state_out = state + 1 (so the states a roll carries are visible)."""
    one = numpy_helper.from_array(np.ones((1, 4), np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "state"], ["y"], name="out"),
         helper.make_node("Add", ["state", "one"], ["state_out"], name="next")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4])], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_time_interleaved_rolls_a_streaming_workload_with_its_states(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """`quant bench dpcrn-stream --profile` and bench_int8.py time a streaming graph as it runs: every frame of the
    utterance in turn, each build carrying its own states (they used to run the first frame with zero states over
    and over)."""
    from quant import timing
    from quant.backends.ort import OrtBoundRun
    from quant.eval.speed import STREAM_ROUND_FRAMES, GraphWorkload

    fed: dict[str, list[tuple[float, float]]] = {}
    run = OrtBoundRun.run

    def spy(self: OrtBoundRun) -> None:  # the timed loop runs the bound graph: (frame, state) read off its outputs
        run(self)
        outputs = self.outputs()
        state = float(outputs["state_out"][0, 0]) - 1.0
        fed.setdefault(self.name, []).append((float(outputs["y"][0, 0]) - state, state))

    monkeypatch.setattr(OrtBoundRun, "run", spy)
    frames = tuple(np.full((1, 4), i, np.float32) for i in range(3))
    workload = GraphWorkload("s", "frame", 0.016, frames=frames, states={"state": np.zeros((1, 4), np.float32)},
                             frame_input="x", state_outputs={"state": "state_out"})
    models = {"fp32": stream_model(tmp_path / "a.onnx"), "int8": stream_model(tmp_path / "b.onnx")}
    result = timing.time_interleaved(models, workload, runs=4, warmup=1)
    assert {label: len(values) for label, values in result.seconds.items()} == {"fp32": 4, "int8": 4}
    assert result.frames_per_round == STREAM_ROUND_FRAMES
    calls = (4 + 1) * STREAM_ROUND_FRAMES  # warm-up round + timed rounds, every frame of the roll in turn
    assert fed["a.onnx"] == [(float(i % 3), float(i)) for i in range(calls)] == fed["b.onnx"]
    assert "streaming frames" in format_interleaved(result, "fp32")


@pytest.mark.parametrize("plain_ms, base", [(10.0, "fp32-plain"), (11.0, "fp32")])
def test_bench_profile_divides_by_the_faster_fp32_and_says_which(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], plain_ms: float,
        base: str):
    """Where the spec's rewrites changed the graph, `quant bench --profile` times the plain export's FP32 beside
    the rewritten FP32 and INT8 (injected per-round times) and divides by the faster one."""
    import json

    import quant.eval.profile
    from quant import timing
    from quant.cli import main
    from quant.timing import InterleavedResult, ModelProfile

    paths = {"fp32": tmp_path / "fp32.onnx", "fp32-plain": tmp_path / "plain.onnx", "int8": tmp_path / "int8.onnx"}
    ms = {"fp32": 10.5, "fp32-plain": plain_ms, "int8": 8.4}
    timed: list[dict[str, Path]] = []

    def time_interleaved(models: dict[str, Path], feeds: object, runs: int, threads: int) -> InterleavedResult:
        timed.append(dict(models))
        return InterleavedResult({label: [ms[label] / 1000.0] * 4 for label in models}, 1.0, 1.0)

    class Comparison:
        def to_dict(self) -> dict[str, object]:
            return {}

    profiled = ModelProfile(paths["fp32"], paths["int8"], Comparison(),  # type: ignore[arg-type]
                            tmp_path / "rewritten.onnx", paths["fp32-plain"])
    monkeypatch.setattr(timing, "profile_model", lambda *args: profiled)
    monkeypatch.setattr(timing, "time_interleaved", time_interleaved)
    monkeypatch.setattr(timing, "timing_workload", lambda model, path: None)
    monkeypatch.setattr(quant.eval.profile, "format_profile", lambda comparison: "profile")
    out = tmp_path / "bench.json"
    assert main(["bench", "dpcrn", "--profile", "--json", str(out)]) == 0
    assert timed == [paths]
    written = json.loads(out.read_text())["interleaved"]
    assert written["ratios_vs"] == base
    assert written["ratios"]["int8"]["median_ratio"] == pytest.approx(8.4 / ms[base])
    text = capsys.readouterr().out
    assert ("ratios are against fp32-plain" in text) == (base == "fp32-plain")
