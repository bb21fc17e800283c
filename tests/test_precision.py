"""One test per precision rule and per translation, on tiny onnx.helper graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.errors import BuildError
from quant.precision import (
    DATA_MOVEMENT_OPS, Rule, fp16_block_lists, load_rules, ort_quant_spec, plan, qdq_sites, trt_layer_precisions,
)

RNG = np.random.default_rng(0)
# The tiny graphs start with the op under test right at the graph input, and their weight MatMuls stand for any
# static INT8 compute op; the input-layer and linear-dynamic-ort rules have their own tests.
RULES = tuple(r for r in load_rules() if r.name not in ("input-layer", "linear-dynamic-ort"))


def init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def make(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def decisions(model, precision="int8", backend="ort", rules=RULES) -> dict[str, tuple[str, str]]:
    return {d.node: (d.precision, d.rule) for d in plan(model, rules, precision, backend).decisions}


def softmax_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("Softmax", ["a"], ["p"], name="sm", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2")]
    return make(nodes, [("x", [2, 4])], [("y", [2, 4])], [init("w1", 4, 4), init("w2", 4, 4)])


def layernorm_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("ReduceMean", ["h"], ["mean"], name="ln_mean", axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["centered"], name="ln_sub"),
        helper.make_node("Pow", ["centered", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln_var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["centered", "std"], ["normed"], name="ln_div"),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="ln_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["ln_out"], name="ln_beta"),
        helper.make_node("MatMul", ["ln_out", "w2"], ["y"], name="mm2"),
    ]
    inits = [init("w1", 4, 4), init("w2", 4, 4), scalar("two", 2.0), scalar("eps", 1e-5), init("gamma", 4),
             init("beta", 4)]
    return make(nodes, [("x", [2, 4])], [("y", [2, 4])], inits, opset=13)


def residual_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
        helper.make_node("MatMul", ["a", "w1"], ["b"], name="mm1"),
        helper.make_node("Relu", ["b"], ["b_act"], name="relu"),
        helper.make_node("Add", ["a", "b_act"], ["c"], name="residual"),
        helper.make_node("MatMul", ["c", "w3"], ["d"], name="mm3"),
        helper.make_node("MatMul", ["c", "w4"], ["e"], name="mm4"),
        helper.make_node("Add", ["d", "e"], ["f"], name="branches"),
        helper.make_node("MatMul", ["f", "w5"], ["y"], name="mm5"),
    ]
    inits = [init(f"w{i}", 4, 4) for i in (0, 1, 3, 4, 5)]
    return make(nodes, [("x", [2, 4])], [("y", [2, 4])], inits)


def streaming_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Concat", ["cache", "x"], ["cat"], name="cache_concat", axis=1),
        helper.make_node("MatMul", ["cat", "w"], ["y"], name="mm"),
        helper.make_node("Slice", ["cat", "starts", "ends", "axes"], ["cache_out"], name="cache_slice"),
    ]
    inits = [init("w", 8, 4), numpy_helper.from_array(np.array([4], np.int64), "starts"),
             numpy_helper.from_array(np.array([8], np.int64), "ends"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    return make(nodes, [("x", [1, 4]), ("cache", [1, 4])], [("y", [1, 4]), ("cache_out", [1, 4])], inits)


def mask_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["mix", "w"], ["h"], name="mm"),
        helper.make_node("Sigmoid", ["h"], ["mask"], name="sig"),
        helper.make_node("Mul", ["mix", "mask"], ["masked"], name="apply_mask"),
        helper.make_node("Sub", ["masked", "bias"], ["enh"], name="mask_shift"),
        helper.make_node("Mul", ["h", "gain"], ["aux"], name="inner_mul"),
        helper.make_node("MatMul", ["aux", "w2"], ["aux2"], name="mm2"),
    ]
    inits = [init("w", 4, 4), init("w2", 4, 4), scalar("bias", 0.1), scalar("gain", 2.0)]
    return make(nodes, [("mix", [1, 4])], [("enh", [1, 4]), ("aux2", [1, 4])], inits)


def lstm_model() -> onnx.ModelProto:
    hidden, width = 3, 4
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], name="lstm", hidden_size=hidden)]
    inits = [init("W", 1, 4 * hidden, width), init("R", 1, 4 * hidden, hidden), init("B", 1, 8 * hidden)]
    return make(nodes, [("x", [5, 1, width])], [("Y", [5, 1, 1, hidden])], inits)


def conv_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w_full"], ["a"], name="conv_full", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_dw"], ["b"], name="conv_dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["b", "w_tr"], ["y"], name="deconv"),
    ]
    inits = [init("w_full", 4, 2, 3, 3), init("w_dw", 4, 1, 3, 3), init("w_tr", 4, 3, 1, 1)]
    return make(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 3, 5, 5])], inits)


# ---------------------------------------------------------------------------------------------- one per rule


def test_softmax_stays_fp32_in_int8_and_fp16_builds():
    int8 = decisions(softmax_model(), "int8")
    assert int8["sm"] == ("fp32", "softmax")
    assert int8["mm1"] == ("int8", "int8-compute")
    fp16 = decisions(softmax_model(), "fp16")
    assert fp16["sm"] == ("fp32", "softmax")
    assert fp16["mm1"] == ("fp16", "default")


def test_fp32_build_ignores_rules():
    assert set(decisions(softmax_model(), "fp32").values()) == {("fp32", "default")}


def test_decomposed_layernorm_is_found_whole():
    got = decisions(layernorm_model(), "fp16")
    ln_nodes = [n for n in got if n.startswith("ln_")]
    assert len(ln_nodes) == 9
    assert all(got[n] == ("fp32", "layernorm-decomposed") for n in ln_nodes)
    assert got["mm1"] == ("fp16", "default")


def test_layernorm_op():
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)]
    model = make(nodes, [("x", [2, 4])], [("y", [2, 4])], [init("g", 4), init("b", 4)])
    assert decisions(model, "int8")["ln"] == ("fp32", "layernorm-op")


def test_reduce_outside_layernorm():
    nodes = [helper.make_node("ReduceSum", ["x"], ["y"], name="rs", axes=[1])]
    model = make(nodes, [("x", [2, 4])], [("y", [2])], [], opset=11)
    assert decisions(model, "fp16")["rs"] == ("fp32", "reduce")


def test_residual_add_is_kept_but_a_branch_add_is_not():
    model = residual_model()
    got = decisions(model, "int8")
    assert got["residual"] == ("fp32", "residual-add")
    assert got["branches"] == ("fp32", "default")
    add_int8 = RULES + (Rule(name="adds", precision="int8", op_types=("Add",), builds=("int8",)),)
    custom = decisions(model, "int8", rules=add_int8)
    assert custom["residual"] == ("fp32", "residual-add")
    assert custom["branches"] == ("int8", "adds")


def test_residual_add_not_applied_in_fp16():
    assert decisions(residual_model(), "fp16")["residual"] == ("fp16", "default")


def test_state_concat_and_slice_of_a_streaming_model():
    got = decisions(streaming_model(), "int8")
    assert got["cache_concat"] == ("fp32", "state-plumbing")
    assert got["cache_slice"] == ("fp32", "state-plumbing")
    assert got["mm"] == ("int8", "int8-compute")


def test_state_pattern_with_explicit_mapping():
    model = streaming_model()
    model.graph.output[1].name = "next_cache"
    model.graph.node[2].output[0] = "next_cache"
    assert decisions(model, "int8")["cache_concat"][1] != "state-plumbing"
    mapped = plan(model, RULES, "int8", "ort", states={"cache": "next_cache"})
    assert mapped.decision("cache_concat").rule == "state-plumbing"


def test_final_mask_arithmetic():
    got = decisions(mask_model(), "int8")
    assert got["apply_mask"] == ("fp32", "mask-math")
    assert got["mask_shift"] == ("fp32", "mask-math")
    assert got["inner_mul"] == ("fp32", "default")  # consumes no graph input


def test_lstm_dynamic_on_ort_fp32_on_trt():
    assert decisions(lstm_model(), "int8", "ort")["lstm"] == ("int8-dynamic", "lstm-dynamic")
    assert decisions(lstm_model(), "int8", "trt")["lstm"] == ("fp32", "recurrent")
    assert decisions(lstm_model(), "fp16", "ort")["lstm"] == ("fp32", "recurrent")


def test_weight_matmul_dynamic_on_ort_static_on_trt():
    """A Linear layer's MatMul (constant weight) is DynamicQuantizeMatMul on ORT; a product of two activations
    (attention scores) keeps the static kernel; TensorRT has no dynamic INT8 and gets the static plan."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"], name="linear"),
             helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["q", "xt"], ["y"], name="scores")]
    model = make(nodes, [("x", [2, 4])], [("y", [2, 2])], [init("w", 4, 4)])
    shipped = tuple(r for r in load_rules() if r.name != "input-layer")
    ort = decisions(model, "int8", "ort", shipped)
    assert ort["linear"] == ("int8-dynamic", "linear-dynamic-ort")
    assert ort["scores"] == ("int8", "int8-compute")
    assert decisions(model, "int8", "trt", shipped)["linear"] == ("int8", "int8-compute")
    assert decisions(model, "fp16", "ort", shipped)["linear"] == ("fp16", "default")
    spec = ort_quant_spec(plan(model, shipped, "int8", "ort"))
    assert spec.dynamic_nodes == ("linear",) and spec.dynamic_op_types == ("MatMul",)
    assert spec.nodes_to_quantize == ("scores",)


def test_gru_never_dynamic_on_ort():
    rules = (Rule(name="all-dynamic", precision="int8-dynamic", op_types=("GRU", "LSTM"), builds=("int8",)),)
    hidden = 2
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["Y"], name="gru", hidden_size=hidden)]
    model = make(nodes, [("x", [3, 1, 4])], [("Y", [3, 1, 1, hidden])],
                 [init("W", 1, 3 * hidden, 4), init("R", 1, 3 * hidden, hidden)])
    assert decisions(model, "int8", "ort", rules)["gru"] == ("fp32", "all-dynamic")


def test_depthwise_and_convtranspose():
    ort = decisions(conv_model(), "int8", "ort")
    assert ort["conv_full"] == ("int8", "int8-compute")
    assert ort["conv_dw"] == ("fp32", "depthwise-conv")
    assert ort["deconv"] == ("fp32", "convtranspose-ort")
    assert decisions(conv_model(), "int8", "trt")["deconv"] == ("int8", "int8-compute")


def test_name_regex_rule_and_first_match_wins():
    rules = (Rule(name="keep-first", precision="fp32", name_regex="^mm1$", builds=("int8",)),) + RULES
    got = decisions(softmax_model(), "int8", rules=rules)
    assert got["mm1"] == ("fp32", "keep-first")
    assert got["mm2"] == ("fp32", "attention-probs")
    assert decisions(softmax_model(), "int8")["mm1"] == ("int8", "int8-compute")


def test_unnamed_nodes_get_stable_names():
    model = softmax_model()
    for node in model.graph.node:
        node.name = ""
    names = [d.node for d in plan(model, RULES, "int8").decisions]
    assert names == ["MatMul_0", "Softmax_1", "MatMul_2"]


# ------------------------------------------------------------------------------------------ rule files


def test_rule_validation():
    with pytest.raises(BuildError, match="precision"):
        Rule(name="x", precision="int4", op_types=("Add",))
    with pytest.raises(BuildError, match="at least one"):
        Rule(name="x", precision="fp32")
    with pytest.raises(BuildError, match="unknown pattern"):
        Rule(name="x", precision="fp32", pattern="attention")
    with pytest.raises(BuildError, match="name_regex"):
        Rule(name="x", precision="fp32", name_regex="(")


def test_load_rules_file(tmp_path: Path):
    good = tmp_path / "rules.toml"
    good.write_text('[[rule]]\nname = "sm"\nop_types = ["Softmax"]\nprecision = "fp16"\n')
    assert load_rules(good) == (Rule(name="sm", op_types=("Softmax",), precision="fp16"),)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "sm"\nop = ["Softmax"]\nprecision = "fp32"\n')
    with pytest.raises(BuildError, match="unknown keys"):
        load_rules(bad)
    with pytest.raises(BuildError, match="no such rules file"):
        load_rules(tmp_path / "missing.toml")


def test_plan_summary_says_why():
    summary = plan(softmax_model(), RULES, "int8").summary()
    assert summary == {"MatMul": {"fp32 (attention-probs)": 1, "int8 (int8-compute)": 1},
                       "Softmax": {"fp32 (softmax)": 1}}


# ------------------------------------------------------------------------------------------ translations


def test_ort_quant_spec():
    spec = ort_quant_spec(plan(layernorm_model(), RULES, "int8"))
    assert spec.op_types_to_quantize == ("MatMul",)
    assert spec.nodes_to_quantize == ("mm1", "mm2")
    assert "ln_sub" in spec.nodes_to_exclude and "ln_sub" in spec.protected_nodes
    lstm = ort_quant_spec(plan(lstm_model(), RULES, "int8"))
    assert lstm.dynamic_nodes == ("lstm",) and lstm.dynamic_op_types == ("LSTM",)


def test_fp16_block_lists_keep_converter_defaults():
    op_blocks, node_blocks = fp16_block_lists(plan(layernorm_model(), RULES, "fp16"))
    assert "Resize" in op_blocks and "TopK" in op_blocks
    assert set(node_blocks) == {f"ln_{s}" for s in ("mean", "sub", "pow", "var", "add_eps", "sqrt", "div", "gamma",
                                                      "beta")}


def test_qdq_sites_only_on_int8_inputs():
    model = layernorm_model()
    sites = {s.tensor: s for s in qdq_sites(model, plan(model, RULES, "int8", "trt"))}
    assert set(sites) == {"x", "w1", "ln_out", "w2"}
    assert sites["ln_out"].consumers == ("mm2",)
    assert sites["w1"].is_weight and sites["w1"].axis == 1
    assert "h" not in sites  # mm1's output feeds only float LayerNorm nodes


def test_qdq_sites_weight_axes():
    model = conv_model()
    sites = {s.tensor: s for s in qdq_sites(model, plan(model, RULES, "int8", "trt"))}
    assert sites["w_full"].axis == 0
    assert sites["w_tr"].axis == 1
    assert "w_dw" not in sites


def test_trt_layer_precisions():
    layers = dict(trt_layer_precisions(plan(lstm_model(), RULES, "int8", "ort")))
    assert layers == {"lstm": "fp32"}


def test_trt_layer_precisions_leave_unruled_nodes_to_tensorrt():
    """Only rule decisions are pinned: the Relu (no rule, default fp32 in an INT8 build; default fp16 in an FP16
    build) must not be forced to a precision under OBEY_PRECISION_CONSTRAINTS."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["y"], name="sm", axis=-1)]
    model = make(nodes, [("x", [2, 4])], [("y", [2, 4])], [init("w1", 4, 4)])
    int8_plan = plan(model, RULES, "int8", "trt")
    assert int8_plan.decision("relu").precision == "fp32"  # the default, not a rule
    assert dict(trt_layer_precisions(int8_plan)) == {"mm1": "int8", "sm": "fp32"}
    assert dict(trt_layer_precisions(plan(model, RULES, "fp16", "trt"))) == {"sm": "fp32"}


def test_input_layer_reads_the_raw_feature_but_not_states():
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
        helper.make_node("Concat", ["cache", "padded"], ["cat"], name="cache_concat", axis=1),
        helper.make_node("MatMul", ["cat", "w1"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
        helper.make_node("MatMul", ["cache", "w3"], ["state_only"], name="state_reader"),
        helper.make_node("Add", ["state_only", "y"], ["z"], name="add"),
        helper.make_node("Slice", ["cat", "starts", "ends", "axes"], ["cache_out"], name="cache_slice"),
    ]
    inits = [numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "pads"), init("w1", 8, 4), init("w2", 4, 4),
             init("w3", 4, 4), numpy_helper.from_array(np.array([4], np.int64), "starts"),
             numpy_helper.from_array(np.array([8], np.int64), "ends"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    model = make(nodes, [("x", [1, 4]), ("cache", [1, 4])], [("z", [1, 4]), ("cache_out", [1, 4])], inits)
    got = decisions(model, "int8", rules=tuple(r for r in load_rules() if r.name != "linear-dynamic-ort"))
    assert got["first"] == ("fp32", "input-layer")
    assert got["second"] == ("int8", "int8-compute")
    assert got["state_reader"] == ("int8", "int8-compute")  # reads only a recurrent state


def test_skip_concat_but_not_state_concat():
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["enc"], name="encoder"),
        helper.make_node("MatMul", ["enc", "w1"], ["mid"], name="middle"),
        helper.make_node("Concat", ["enc", "mid"], ["skip"], name="skip_join", axis=1),
        helper.make_node("Concat", ["cache", "skip"], ["cat"], name="cache_join", axis=1),
        helper.make_node("Transpose", ["cat"], ["cat_t"], name="layout", perm=[0, 1]),
        helper.make_node("MatMul", ["cat_t", "w2"], ["y"], name="decoder"),
        helper.make_node("Concat", ["cache", "mid"], ["state_cat"], name="state_join", axis=1),
        helper.make_node("MatMul", ["state_cat", "w3"], ["z"], name="state_reader"),
        helper.make_node("Slice", ["cat", "starts", "ends", "axes"], ["cache_out"], name="cache_slice"),
    ]
    inits = [init("w0", 4, 4), init("w1", 4, 4), init("w2", 12, 4), init("w3", 8, 4),
             numpy_helper.from_array(np.array([8], np.int64), "starts"),
             numpy_helper.from_array(np.array([12], np.int64), "ends"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    model = make(nodes, [("x", [1, 4]), ("cache", [1, 4])],
                 [("y", [1, 4]), ("z", [1, 4]), ("cache_out", [1, 4])], inits)
    got = decisions(model, "int8", "trt")
    assert got["decoder"] == ("fp32", "skip-concat")
    assert got["state_reader"] == ("int8", "int8-compute")
    assert got["middle"] == ("int8", "int8-compute")


def test_reshape_by_a_computed_shape_is_not_a_skip_concat():
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="first"),
        helper.make_node("Shape", ["h"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["dim0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["dim0", "axes0"], ["dim0_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["dim0_1d", "four"], ["new_shape"], name="shape_concat", axis=0),
        helper.make_node("Reshape", ["h", "new_shape"], ["h2"], name="reshape"),
        helper.make_node("MatMul", ["h2", "w1"], ["y"], name="second"),
    ]
    inits = [init("w0", 4, 4), init("w1", 4, 4), numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([4], np.int64), "four")]
    model = make(nodes, [("x", [2, 4])], [("y", [2, 4])], inits)
    assert decisions(model, "int8")["second"] == ("int8", "int8-compute")


def test_fp16_unsupported_ops_are_planned_fp32():
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", axis=-1)]
    model = make(nodes, [("x", [2, 4])], [("values", [2, 2])],
                 [numpy_helper.from_array(np.array([2], np.int64), "k")])
    model.graph.output.append(helper.make_tensor_value_info("indices", TensorProto.INT64, [2, 2]))
    assert decisions(model, "fp16")["topk"] == ("fp32", "fp16-unsupported")


def test_attention_probabilities_times_values():
    nodes = [
        helper.make_node("MatMul", ["q", "k_t"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("Where", ["mask", "zero", "probs"], ["masked"], name="mask_probs"),
        helper.make_node("MatMul", ["masked", "v"], ["context"], name="attn_v"),
        helper.make_node("MatMul", ["context", "w"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("q", "k_t", "v")]
        + [helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [init("w", 4, 4), scalar("zero", 0.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    got = decisions(model, "int8")
    assert got["attn_v"] == ("fp32", "attention-probs")
    assert got["qk"] == ("int8", "int8-compute") and got["out_proj"] == ("int8", "int8-compute")


def test_leakyrelu_precision_is_a_rule_not_a_default():
    """The shipped rules decide LeakyRelu's precision by name (measured on the trained DPCRN: see the rule's why),
    for ORT and TensorRT alike, rather than leaving it to whatever ORT fuses around an unruled node."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["a"], ["b"], name="act", alpha=0.2),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = make(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 4, 5, 5])], [init("w1", 4, 2, 3, 3), init("w2", 4, 4, 3, 3)])
    for backend in ("ort", "trt"):
        assert decisions(model, backend=backend)["act"] == ("fp32", "leakyrelu-float")
    assert decisions(model, precision="fp16")["act"][1] != "leakyrelu-float"  # an int8 rule only


# ---- data movement between integer ops (an opt-in rule: not shipped, measured no faster on the DPCRNs) ---------------

DATA_MOVEMENT = Rule(name="data-movement-int8", op_types=tuple(sorted(DATA_MOVEMENT_OPS)), precision="int8",
                     builds=("int8",))


def test_data_movement_behind_an_integer_conv_is_int8_as_a_chain():
    """A Reshape -> Transpose chain between two INT8 convs runs on the integer tensor (no DQ -> copy -> Q)."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),  # conv1 is not the input layer
             helper.make_node("Conv", ["s", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["a", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["t"], name="swap", perm=[0, 1, 3, 2]),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [init("w1", 4, 2, 3, 3), init("w2", 4, 4, 3, 3),
             numpy_helper.from_array(np.array([1, 4, 5, 5], np.int64), "shape")]
    model = make(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 4, 5, 5])], inits)
    for backend in ("ort", "trt"):  # TensorRT runs such copies in int8 too
        got = decisions(model, backend=backend, rules=(*RULES, DATA_MOVEMENT))
        assert got["reshape"] == got["swap"] == ("int8", "data-movement-int8")
        assert got["conv1"] == got["conv2"] == ("int8", "int8-compute")


def test_data_movement_after_a_float_op_stays_float():
    """A Transpose reading a float op's output (here feeding an LSTM, which takes float input) would only add a
    QuantizeLinear: it stays fp32 and the plan says why."""
    hidden = 3
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),
             helper.make_node("Transpose", ["s"], ["t"], name="to_time_major", perm=[1, 0, 2]),
             helper.make_node("LSTM", ["t", "w", "r"], ["y"], name="lstm", hidden_size=hidden)]
    inits = [init("w", 1, 4 * hidden, 4), init("r", 1, 4 * hidden, hidden)]
    model = make(nodes, [("x", [2, 5, 4])], [("y", [5, 1, 2, hidden])], inits)
    got = decisions(model, rules=(*RULES, DATA_MOVEMENT))
    assert got["to_time_major"] == ("fp32", "data-movement-int8: float input")
    assert got["lstm"] == ("int8-dynamic", "lstm-dynamic")


def test_a_concat_is_int8_only_when_every_input_is():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),
             helper.make_node("Conv", ["s", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["s", "w2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["ab"], name="both_int8", axis=1),
             helper.make_node("Concat", ["a", "s"], ["as"], name="one_float", axis=1)]
    inits = [init("w1", 4, 2, 3, 3), init("w2", 4, 2, 3, 3)]
    model = make(nodes, [("x", [1, 2, 5, 5])], [("ab", [1, 8, 5, 5]), ("as", [1, 6, 5, 5])], inits)
    got = decisions(model, rules=(*RULES, DATA_MOVEMENT))
    assert got["both_int8"] == ("int8", "data-movement-int8")
    assert got["one_float"] == ("fp32", "data-movement-int8: float input")
