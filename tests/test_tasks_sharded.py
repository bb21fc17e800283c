"""quant.tasks.sharded: a spec's evaluation in shards gives the in-process result, for SE (offline, streaming user
spec) and ASR specs, locally and on a 2-CPU local Ray cluster (conftest `ray_cluster`); a failing shard is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.executor import LocalExecutor, RayExecutor, ShardError
from quant.paths import calib_data_dir
from quant.spec import ModelSpec, load_spec
from quant.tasks import task_for
from quant.tasks.sharded import evaluate_sharded, utterance_shards

SE_TEST = str(calib_data_dir() / "se_test" / "manifest.jsonl")
ASR_TEST = str(calib_data_dir() / "asr_test" / "manifest.jsonl")


def soft_mask_model(path: Path) -> Path:
    """enh = mix * sigmoid(3 * mix): the offline DPCRN's I/O (mix -> enh, 563 frames), scores differ per utterance."""
    from quant.features import FREQ_BINS, SEGMENT_FRAMES

    shape: list[str | int] = ["B", FREQ_BINS, SEGMENT_FRAMES, 2]
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["mix", "three"], ["scaled"]), helper.make_node("Sigmoid", ["scaled"], ["mask"]),
         helper.make_node("Mul", ["mix", "mask"], ["enh"])], "soft_mask",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("enh", TensorProto.FLOAT, shape)], [three])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def streaming_spec(tmp_path: Path) -> ModelSpec:
    """A user's streaming SE spec (states named unlike their outputs, a spectrum mask) over a 1-frame decay graph."""
    freq = 257
    decay = numpy_helper.from_array(np.array(0.5, np.float32), "decay")
    nodes = [helper.make_node("Mul", ["h0", "decay"], ["kept"]), helper.make_node("Add", ["kept", "frame"], ["acc"]),
             helper.make_node("Sigmoid", ["acc"], ["gate"]), helper.make_node("Mul", ["frame", "gate"], ["enh"])]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, freq, 1]) for n in ("frame", "h0", "enh", "acc")]
    graph = helper.make_graph(nodes, "decay", value[:2], value[2:], [decay])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
              str(tmp_path / "decay.onnx"))
    (tmp_path / "decay.toml").write_text(f"""
[model]
name = "decay"
task = "se"
[[graphs]]
role = "enhancer"
path = "decay.onnx"
[frontend]
transform = "magnitude"
frame = 512
hop = 256
window = "sqrt_hann"
[streaming]
frame_input = "frame"
[[streaming.states]]
input = "h0"
output = "acc"
shape = [1, 257, 1]
[output]
name = "enh"
kind = "spectrum"
[defaults]
test_manifest = "{SE_TEST}"
""")
    return load_spec(tmp_path / "decay.toml")


def asr_spec(tmp_path: Path) -> ModelSpec:
    """tests/test_tasks_asr.py's tiny U2++ spec (fbank -> projection encoder) with a decoder that picks the n-best
    entry of highest CTC score in-graph (`best_index`)."""
    from test_tasks_asr import tiny_u2pp

    spec = tiny_u2pp(tmp_path, 0.3)
    decoder = onnx.load(str(tmp_path / "decoder.onnx"))
    del decoder.graph.node[:], decoder.graph.output[:]
    decoder.graph.node.append(helper.make_node("ArgMax", ["ctc_score"], ["best_index"], axis=1, keepdims=0))
    decoder.graph.output.append(helper.make_tensor_value_info("best_index", TensorProto.INT64, ["B"]))
    onnx.save(decoder, str(tmp_path / "decoder.onnx"))
    return load_spec(spec)


def test_shards_start_at_the_tasks_unit() -> None:
    assert [list(s.payload) for s in utterance_shards(ASR_TEST, 10, 4, unit=8)] == [list(range(8)), [8, 9]]
    assert [s.covers for s in utterance_shards(SE_TEST, 3, 2, unit=1)] == [("utterance 1", "utterance 2"),
                                                                         ("utterance 3",)]


def test_local_shards_give_the_in_process_se_result(tmp_path: Path) -> None:
    spec, model = load_spec("dpcrn"), soft_mask_model(tmp_path / "se.onnx")
    whole = task_for(spec).evaluate({"enhancer": model}, SE_TEST, 3)
    sharded = evaluate_sharded(spec, {"enhancer": model}, SE_TEST, 3, LocalExecutor(), shards=2)
    assert sharded == whole and sharded.task_fields()["utterances"] == 3
    assert sharded.per_utterance_columns() == whole.per_utterance_columns()


def test_local_shards_give_the_in_process_streaming_result(tmp_path: Path) -> None:
    spec = streaming_spec(tmp_path)
    whole = task_for(spec).evaluate({"enhancer": tmp_path / "decay.onnx"}, limit=2)
    sharded = evaluate_sharded(spec, {"enhancer": tmp_path / "decay.onnx"}, None, 2, LocalExecutor(), shards=2)
    assert sharded == whole and sharded.task_fields()["utterances"] == 2


def test_ray_gives_the_in_process_results(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    spec, model = load_spec("dpcrn"), soft_mask_model(tmp_path / "se.onnx")
    on_ray = evaluate_sharded(spec, {"enhancer": model}, SE_TEST, 3, ray_cluster, shards=3)
    assert on_ray == task_for(spec).evaluate({"enhancer": model}, SE_TEST, 3)
    asr = asr_spec(tmp_path)
    graphs = {"encoder": tmp_path / "encoder.onnx", "decoder": tmp_path / "decoder.onnx"}
    on_ray_asr = evaluate_sharded(asr, graphs, ASR_TEST, 10, ray_cluster, shards=2)  # 8 + 2 utterances
    whole = task_for(asr).evaluate(graphs, ASR_TEST, 10)
    assert on_ray_asr == whole and on_ray_asr.task_fields()["utterances"] == 10
    assert on_ray_asr.per_utterance_columns() == whole.per_utterance_columns()


def test_ray_names_the_shard_whose_utterance_fails(tmp_path: Path, ray_cluster: RayExecutor) -> None:
    """Utterance 3 does not match its manifest sha256: the worker's ManifestError fails shard 2, named."""
    lines = [json.loads(line) for line in Path(SE_TEST).read_text().splitlines()[:3]]
    for item in lines:
        for key in ("path", "noise"):
            (tmp_path / item[key]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / item[key]).write_bytes((Path(SE_TEST).parent / item[key]).read_bytes())
    lines[2]["sha256"] = "0" * 64
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    model = soft_mask_model(tmp_path / "se.onnx")
    failed = r"shard 2 of 2 \(utterance 3\) failed on ray: ManifestError: .*checksum mismatch"
    with pytest.raises(ShardError, match=failed):
        evaluate_sharded(load_spec("dpcrn"), {"enhancer": model}, tmp_path / "manifest.jsonl", None, ray_cluster,
                         shards=2)


def test_external_data_travels_with_its_model(tmp_path: Path) -> None:
    """A user's graph that keeps its weights in a file beside it: shipped with it, the workers' result unchanged."""
    from quant.tasks.sharded import Artifacts, external_data

    model = onnx.load(str(soft_mask_model(tmp_path / "inline.onnx")))
    (tmp_path / "user").mkdir()
    onnx.save(model, str(tmp_path / "user" / "se.onnx"), save_as_external_data=True, location="se.weights",
              size_threshold=0)
    assert external_data(tmp_path / "user" / "se.onnx") == ["se.weights"]
    (beside,) = Artifacts.read({"enhancer": tmp_path / "user" / "se.onnx"}).files[0].beside
    assert beside[0] == "se.weights"
    spec = load_spec("dpcrn")
    sharded = evaluate_sharded(spec, {"enhancer": tmp_path / "user" / "se.onnx"}, SE_TEST, 2, LocalExecutor(),
                               shards=2)
    assert sharded == task_for(spec).evaluate({"enhancer": tmp_path / "inline.onnx"}, SE_TEST, 2)
