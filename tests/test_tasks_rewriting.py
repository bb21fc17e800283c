"""A spec's graph rewrites inside the commands (quant.tasks.rewriting): a tiny SE graph with a ConvTranspose, a
single-slope PRelu and a Conv over a channel Concat, built through the CLI from its spec with and without rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.backends import open_runner
from quant.calib.cache import read_entry
from quant.cli import main
from quant.spec import load_spec
from quant.tasks import FeedOptions, task_for
from quant.tasks.rewriting import rewrite_graphs
from test_cli_specs import working_dir
from test_tasks_se import tiny_manifest

F = 257
ALL = "deconv-to-conv,split-concat-conv,prelu-to-leakyrelu"


def tiny_graph(path: Path) -> Path:
    """mag (B, 257, T) -> ConvTranspose (4 ch) -> PRelu -> Concat with the deconv output -> Conv -> Sigmoid mask."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((0.05 * rng.standard_normal((F, 4, 3))).astype(np.float32), "up_w"),
             numpy_helper.from_array(np.array([0.2], np.float32).reshape(1, 1), "slope"),
             numpy_helper.from_array((0.3 * rng.standard_normal((F, 8, 1))).astype(np.float32), "out_w"),
             numpy_helper.from_array((0.1 * rng.standard_normal(F)).astype(np.float32), "out_b")]
    nodes = [helper.make_node("ConvTranspose", ["mag", "up_w"], ["up"], name="up", pads=[1, 1]),
             helper.make_node("PRelu", ["up", "slope"], ["act"], name="act"),
             helper.make_node("Concat", ["up", "act"], ["joined"], name="join", axis=1),
             helper.make_node("Conv", ["joined", "out_w", "out_b"], ["logits"], name="out"),
             helper.make_node("Sigmoid", ["logits"], ["mask"], name="sigmoid")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("mag", TensorProto.FLOAT, ["B", F, "T"])],
                              [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", F, "T"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_spec(tmp_path: Path, rewrites: str = ALL) -> Path:
    tiny_graph(tmp_path / "tiny.onnx")
    names = ", ".join(f'"{n}"' for n in rewrites.split(",") if n)
    spec = tmp_path / "tiny.toml"
    spec.write_text(f"""
[model]
name = "tiny"
task = "se"
[[graphs]]
role = "enhancer"
path = "tiny.onnx"
feeds = [{{ input = "mag", from = "frontend" }}]
rewrites = [{names}]
[frontend]
transform = "magnitude"
frame = 512
hop = 128
window = "none"
[output]
name = "mask"
kind = "mask_magnitude"
[defaults]
calibration_manifest = "{tiny_manifest(tmp_path)}"
batch_size = 1
""")
    return spec


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> int:
    capsys.readouterr()
    return main(list(argv))


def meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def test_spec_rewrites_are_applied_checked_and_recorded(tmp_path: Path) -> None:
    spec = load_spec(tiny_spec(tmp_path))
    graphs = {"enhancer": tmp_path / "tiny.onnx"}
    done = rewrite_graphs(spec, graphs, tmp_path / "engines")["enhancer"]
    assert done.rewritten and done.path.parent == tmp_path / "engines" / "rewrite" / "tiny"
    assert done.nodes == {"deconv-to-conv": 1, "split-concat-conv": 1, "prelu-to-leakyrelu": 1}
    assert done.check is not None and done.check.feeds >= 1 and done.check.relative_error < 1e-5
    ops = {n.op_type for n in onnx.load(str(done.path)).graph.node}
    assert "ConvTranspose" not in ops and "PRelu" not in ops and "LeakyRelu" in ops
    # --no-rewrites: the graph itself
    assert rewrite_graphs(spec, graphs, tmp_path / "engines", override=())["enhancer"].path == graphs["enhancer"]


def test_build_with_rewrites_matches_the_plain_build_and_records_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path)
    with working_dir(tmp_path):
        assert cli(capsys, "build", str(spec), "--precision", "fp32", "-o", "plain", "--no-rewrites") == 0
        assert cli(capsys, "build", str(spec), "--precision", "fp32", "-o", "rewritten") == 0
        assert cli(capsys, "build", str(spec), "--precision", "fp32", "-o", "deconv",
                   "--rewrites", "deconv-to-conv") == 0
    plain, rewritten, deconv = (meta(tmp_path / name) for name in ("plain", "rewritten", "deconv"))
    assert plain["rewrites"] is None
    assert rewritten["rewrites"]["rewrites"] == ALL.split(",")
    assert rewritten["rewrites"]["source_sha256"] == plain["source_sha256"]  # made from the same export
    assert rewritten["rewrites"]["check"]["relative_error"] < 1e-5
    assert deconv["rewrites"]["rewrites"] == ["deconv-to-conv"]  # the CLI override, not the spec's list
    feed = next(iter(task_for(load_spec(spec)).calibration_feeds("enhancer")))
    want = open_runner(tmp_path / "plain" / "model.onnx").run(feed)["mask"]
    for name in ("rewritten", "deconv"):
        got = open_runner(tmp_path / name / "model.onnx").run(feed)["mask"]
        np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))


def test_int8_calibrates_the_rewritten_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path)
    with working_dir(tmp_path):
        for name, flags in (("plain", ["--no-rewrites"]), ("rewritten", [])):
            assert cli(capsys, "build", str(spec), "--precision", "int8", "-o", f"{name}8", *flags) == 0
    plain, rewritten = meta(tmp_path / "plain8"), meta(tmp_path / "rewritten8")
    assert rewritten["rewrites"]["rewrites"] == ALL.split(",") and plain["rewrites"] is None
    keys = [read_entry(tmp_path / m["cache"]["path"]).key for m in (plain, rewritten)]
    assert keys[0].digest() != keys[1].digest()
    assert keys[1].model_sha256 == rewritten["source_sha256"]  # the cache names the graph the build quantized
    assert Path(rewritten["source"]).name == "tiny.deconv-to-conv+split-concat-conv+prelu-to-leakyrelu.onnx"
    # the TensorRT Q/DQ model is built from the same rewritten graph: integer convs, no ConvTranspose
    qdq = onnx.load(str(tmp_path / "rewritten8" / "model_trt_qdq.onnx"))
    assert "ConvTranspose" not in {n.op_type for n in qdq.graph.node}


def test_a_rewrite_that_changes_the_outputs_is_refused_naming_graph_and_rewrite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from quant import rewrite

    def broken(model: onnx.ModelProto) -> rewrite.RewriteResult:
        result = rewrite.prelu_to_leakyrelu(model)
        for node in result.model.graph.node:
            if node.op_type == "LeakyRelu":
                del node.attribute[:]
                node.attribute.extend([helper.make_attribute("alpha", 0.9)])
        return result

    monkeypatch.setitem(rewrite.REWRITES, "prelu-to-leakyrelu", broken)
    spec = tiny_spec(tmp_path)
    with working_dir(tmp_path):
        assert cli(capsys, "build", str(spec), "--precision", "fp32") == 2
    error = capsys.readouterr().err.strip()
    assert "tiny.onnx" in error and "'prelu-to-leakyrelu' changed the outputs" in error
    assert not (tmp_path / "engines" / "tiny").exists()  # nothing built from a graph that failed its check


def test_override_on_an_onnx_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_graph(tmp_path / "tiny.onnx")
    assert cli(capsys, "build", str(path), "--precision", "fp32", "--rewrites", "deconv-to-conv") == 2
    assert "--rewrites needs a model spec" in capsys.readouterr().err


def test_unknown_rewrite_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "dpcrn", "--precision", "fp32", "--rewrites", "deconv-to-conv,fold-everything"])
    assert exit_info.value.code == 2
    assert "fold-everything: not a graph rewrite" in capsys.readouterr().err


def test_feed_options_do_not_leak_into_the_check(tmp_path: Path) -> None:
    """The check runs the original graphs for any roll or chain, whatever graphs the caller's options named."""
    spec = load_spec(tiny_spec(tmp_path))
    options = FeedOptions(graphs={"enhancer": tmp_path / "missing.onnx"})
    done = rewrite_graphs(spec, {"enhancer": tmp_path / "tiny.onnx"}, tmp_path / "engines", feed_options=options)
    assert done["enhancer"].rewritten


@pytest.mark.parametrize("flags, expected", [([], None), (["--no-rewrites"], ()),
                                             (["--rewrites", "deconv-to-conv"], ("deconv-to-conv",))])
def test_run_and_bench_pass_the_override_to_the_pipeline(flags: list[str], expected: tuple[str, ...] | None) -> None:
    from quant.cli import build_parser
    from quant.cli.run import options_from

    for command in ("run", "bench"):
        args = build_parser().parse_args([command, *flags])
        assert options_from(args, command).rewrites == expected
