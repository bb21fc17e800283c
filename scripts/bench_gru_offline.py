"""Where an offline GRU's time goes on ONNX Runtime CPU, and whether any int8 path beats the float GRU node.

    python scripts/bench_gru_offline.py --frames 901 --runs 60      # gru-logpower at published size: 9 s, 256 units

Times, interleaved in one process (1 thread, random weights of gru-logpower's published shape): the GRU node; the
same GRU with input size 1 (its recurrence: the input GEMM all but gone); its input GEMM alone in FP32 and dynamic
int8 (what an int8 input projection would save, if ONNX's GRU could take one); and the GRU as a Scan over frames
with the input GEMM hoisted out (one MatMul over all frames) and the recurrent MatMul in the body as FP32, as ORT's
dynamic quantizer writes it (MatMulInteger chain), as one fused DynamicQuantizeMatMul, and with the hoisted input GEMM
a fused DynamicQuantizeMatMul too, plus a Scan whose body only passes the state on (Scan's own cost per frame). Prints median and min ms and each against the GRU node; the Scan
graphs' max abs difference from the GRU node's output.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]


def _save(graph: onnx.GraphProto, path: Path) -> str:
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=8), str(path))
    return str(path)


def _value(name: str, shape: list[int] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _gru(w: np.ndarray, r: np.ndarray, b: np.ndarray, frames: int) -> onnx.GraphProto:
    node = helper.make_node("GRU", ["x", "w", "r", "b"], ["y", "y_h"], hidden_size=r.shape[2], linear_before_reset=1)
    return helper.make_graph([node], "gru", [_value("x", [frames, 1, w.shape[2]])], [_value("y")],
                             [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (r, "r"), (b, "b"))])


def _matmul(weight: np.ndarray, frames: int) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "gemm",
                             [_value("x", [frames, 1, weight.shape[0]])], [_value("y")],
                             [numpy_helper.from_array(weight, "wt")])


def _step_body(r: np.ndarray, b: np.ndarray, recurrent: str) -> onnx.GraphProto:
    """One linear_before_reset step on the precomputed gx (1, 3H): recurrent = fp32 | fused (int8 R)."""
    hidden = r.shape[2]
    rt = np.ascontiguousarray(r[0].T)
    consts = [numpy_helper.from_array(np.concatenate([np.zeros(2 * hidden, np.float32), b[0, 5 * hidden:]]), "bh"),
              numpy_helper.from_array(np.array([2 * hidden, hidden], np.int64), "sz"),
              numpy_helper.from_array(np.array([hidden, hidden], np.int64), "sz2")]
    if recurrent == "fused":
        product = helper.make_node("DynamicQuantizeMatMul", ["h", "rt_q", "rt_scale", "rt_zero"], ["gh0"],
                                   domain="com.microsoft")
        consts += _int8_weight(rt, "rt")
    else:
        product = helper.make_node("MatMul", ["h", "rt"], ["gh0"])
        consts.append(numpy_helper.from_array(rt, "rt"))
    nodes = [product,
             helper.make_node("Add", ["gh0", "bh"], ["gh"]),
             helper.make_node("Split", ["gx", "sz"], ["gx_zr", "gx_n"], axis=-1),
             helper.make_node("Split", ["gh", "sz"], ["gh_zr", "gh_n"], axis=-1),
             helper.make_node("Add", ["gx_zr", "gh_zr"], ["zr_in"]),
             helper.make_node("Sigmoid", ["zr_in"], ["zr"]),
             helper.make_node("Split", ["zr", "sz2"], ["z", "r"], axis=-1),
             helper.make_node("Mul", ["r", "gh_n"], ["rn"]),
             helper.make_node("Add", ["gx_n", "rn"], ["n_in"]),
             helper.make_node("Tanh", ["n_in"], ["n"]),
             helper.make_node("Sub", ["h", "n"], ["h_minus_n"]),
             helper.make_node("Mul", ["z", "h_minus_n"], ["moved"]),
             helper.make_node("Add", ["n", "moved"], ["h_new"]),
             helper.make_node("Identity", ["h_new"], ["y_t"])]
    return _body(nodes, hidden, consts)


def _body(nodes: list[onnx.NodeProto], hidden: int, consts: list[onnx.TensorProto]) -> onnx.GraphProto:
    return helper.make_graph(nodes, "step", [_value("h", [1, hidden]), _value("gx", [1, 3 * hidden])],
                             [_value("h_new", [1, hidden]), _value("y_t", [1, hidden])], consts)


def _int8_weight(weight: np.ndarray, name: str) -> list[onnx.TensorProto]:
    """A (K, N) weight as DynamicQuantizeMatMul's int8 B, per-tensor symmetric scale, zero point 0."""
    scale = np.float32(np.abs(weight).max() / 127)
    return [numpy_helper.from_array(np.round(weight / scale).astype(np.int8), f"{name}_q"),
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{name}_zero")]


def _scan(w: np.ndarray, b: np.ndarray, body: onnx.GraphProto, frames: int, int8_input: bool = False
          ) -> onnx.GraphProto:
    """gx = x W^T + biases over all frames (one MatMul; int8_input: a fused DynamicQuantizeMatMul), then the body
    once per frame."""
    hidden = w.shape[1] // 3
    x_bias = b[0, :3 * hidden] + np.concatenate([b[0, 3 * hidden:5 * hidden], np.zeros(hidden, np.float32)])
    wt = np.ascontiguousarray(w[0].T)
    if int8_input:
        gemm = helper.make_node("DynamicQuantizeMatMul", ["x", "wt_q", "wt_scale", "wt_zero", "bx"], ["gx"],
                                domain="com.microsoft")
        nodes, inits = [gemm], _int8_weight(wt, "wt")
    else:
        nodes = [helper.make_node("MatMul", ["x", "wt"], ["gx0"]), helper.make_node("Add", ["gx0", "bx"], ["gx"])]
        inits = [numpy_helper.from_array(wt, "wt")]
    nodes.append(helper.make_node("Scan", ["h0", "gx"], ["h_last", "y"], num_scan_inputs=1, body=body))
    inits += [numpy_helper.from_array(x_bias, "bx"), numpy_helper.from_array(np.zeros((1, hidden), np.float32), "h0")]
    return helper.make_graph(nodes, "scan", [_value("x", [frames, 1, w.shape[2]])], [_value("y")], inits)


def build(work: Path, frames: int, size: int, hidden: int) -> dict[str, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1, 3 * hidden, size)) / np.sqrt(size)).astype(np.float32)
    r = (rng.standard_normal((1, 3 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b = (rng.standard_normal((1, 6 * hidden)) / 10).astype(np.float32)
    passing = _body([helper.make_node("Identity", ["h"], ["h_new"]), helper.make_node("Identity", ["h"], ["y_t"])],
                    hidden, [])
    paths = {
        "GRU node": _save(_gru(w, r, b, frames), work / "gru.onnx"),
        "GRU node, input size 1 (recurrence)": _save(_gru(np.ascontiguousarray(w[:, :, :1]), r, b, frames),
                                                     work / "recurrence.onnx"),
        "input GEMM FP32": _save(_matmul(np.ascontiguousarray(w[0].T), frames), work / "gemm.onnx"),
        "Scan GRU FP32": _save(_scan(w, b, _step_body(r, b, "fp32"), frames), work / "scan.onnx"),
        "Scan GRU, fused DynamicQuantizeMatMul": _save(_scan(w, b, _step_body(r, b, "fused"), frames),
                                                       work / "scan_fused.onnx"),
        "Scan GRU, both products fused int8": _save(_scan(w, b, _step_body(r, b, "fused"), frames, int8_input=True),
                                                    work / "scan_int8.onnx"),
        "Scan, body passes h on (overhead)": _save(_scan(w, b, passing, frames), work / "scan_empty.onnx"),
    }
    for label, source in (("input GEMM dynamic int8", "input GEMM FP32"),
                          ("Scan GRU, ORT dynamic quantizer", "Scan GRU FP32")):
        target = work / f"{Path(paths[source]).stem}_int8.onnx"
        quantize_dynamic(paths[source], str(target), weight_type=QuantType.QInt8)
        paths[label] = str(target)
    return paths


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=901, help="frames (9 s at a 10 ms hop: 901)")
    parser.add_argument("--size", type=int, default=256, help="GRU input size")
    parser.add_argument("--hidden", type=int, default=256, help="GRU hidden size")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        paths = build(Path(folder), args.frames, args.size, args.hidden)
        sessions = {k: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = np.random.default_rng(1).standard_normal((args.frames, 1, args.size)).astype(np.float32)
    feeds = {k: {"x": x[:, :, :1].copy() if "size 1" in k else x} for k in sessions}
    reference = sessions["GRU node"].run(None, feeds["GRU node"])[0][:, 0]
    for label in (k for k in sessions if k.startswith("Scan GRU")):
        out = sessions[label].run(None, feeds[label])[0]
        print(f"{label}: max abs difference from the GRU node {np.abs(out - reference).max():.3g} "
              f"(output range {np.abs(reference).max():.3g})")
    times: dict[str, list[float]] = {k: [] for k in sessions}
    load_before = Path("/proc/loadavg").read_text().split()[0]
    for round_ in range(args.runs + 3):  # 3 warm-up rounds
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[label])
            if round_ >= 3:
                times[label].append(1e3 * (time.perf_counter() - start))
    base = np.median(times["GRU node"]), np.min(times["GRU node"])
    print(f"{args.frames} frames, input {args.size}, hidden {args.hidden}, 1 thread, {args.runs} interleaved rounds, "
          f"load {load_before}-{Path('/proc/loadavg').read_text().split()[0]}; median (min) ms, x of the GRU node")
    for label, values in times.items():
        median, low = np.median(values), np.min(values)
        print(f"  {label:<40}{median:9.3f} ({low:7.3f})  {median / base[0]:.2f}x ({low / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
