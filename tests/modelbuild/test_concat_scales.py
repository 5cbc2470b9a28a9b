"""htp_requant.share_concat_scales: a detector head's branches (Conv -> Transpose -> Reshape) concatenated with very
different ranges, as BlazeFace's classifier heads are. QNN folds the Concat's requantization into each branch's
conv, so with the branches' own scales the HTP's multipliers are inexact and whole channels come out codes off;
with the Concat's scale shared down the branches the emulator (CPU fallback off) computes what CPU QDQ does,
and CPU QDQ itself is unchanged but for one rounding."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.modelbuild import htp_requant, qdq
from service.runtime.backends import create_session

C_IN, SIZE = 32, 8
HEADS = {"small": (6, 1.0, 0.5), "large": (4, 60.0, -40.0)}       # channels, weight gain, bias: two ranges


def _head_graph(path, rng):
    inits, nodes, branches = [], [], []
    for name, (channels, gain, bias) in HEADS.items():
        inits += [numpy_helper.from_array((rng.standard_normal((channels, C_IN, 1, 1)) * 0.05 * gain)
                                          .astype(np.float32), f"{name}.weight"),
                  numpy_helper.from_array(np.full(channels, bias, np.float32), f"{name}.bias"),
                  numpy_helper.from_array(np.array([1, -1, 1], np.int64), f"{name}.shape")]
        nodes += [helper.make_node("Conv", ["x", f"{name}.weight", f"{name}.bias"], [f"{name}.y"], name=name),
                  helper.make_node("Transpose", [f"{name}.y"], [f"{name}.t"], perm=[0, 2, 3, 1]),
                  helper.make_node("Reshape", [f"{name}.t", f"{name}.shape"], [f"{name}.r"])]
        branches.append(f"{name}.r")
    nodes.append(helper.make_node("Concat", branches, ["scores"], axis=1))
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                              [1, C_IN, SIZE, SIZE])],
                              [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def _channel_offsets(path, feeds) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor-type (channel of each branch) mean of HTP - CPU QDQ, in the Concat's output units; CPU output."""
    cpu = create_session(path, "cpu")
    htp = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False)
    diffs, outs = [], []
    for f in feeds:
        c, h = cpu.run(None, f)[0], htp.run(None, f)[0]
        outs.append(c)
        small = HEADS["small"][0] * SIZE * SIZE
        diffs.append(np.concatenate([(h - c)[0, :small, 0].reshape(-1, HEADS["small"][0]).mean(0),
                                     (h - c)[0, small:, 0].reshape(-1, HEADS["large"][0]).mean(0)]))
    return np.mean(diffs, axis=0), np.concatenate([o.ravel() for o in outs])


def test_shared_concat_scale_lands_the_htp_on_cpu_qdq(tmp_path):
    rng = np.random.default_rng(0)
    float_path = _head_graph(tmp_path / "heads.onnx", rng)
    feeds = [{"x": np.maximum(rng.standard_normal((1, C_IN, SIZE, SIZE)), 0).astype(np.float32)} for _ in range(8)]
    own, shared = tmp_path / "own.qdq.onnx", tmp_path / "shared.qdq.onnx"
    qdq.quantize_qdq(float_path, own, feeds, "w8a16")
    shared.write_bytes(own.read_bytes())
    htp_requant.align_file(own)
    htp_requant.align_file(shared, concat_scales=True)

    model = onnx.load(str(shared))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    q_cat = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == cat.output[0])
    conv_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith(".y")]
    assert len(conv_q) == 2 and all(inits[q.input[1]] == inits[q_cat.input[1]] for q in conv_q)
    assert htp_requant.share_concat_scales(model) == 0                        # idempotent

    before, cpu_own = _channel_offsets(own, feeds)
    after, cpu_shared = _channel_offsets(shared, feeds)
    step = float(inits[q_cat.input[1]])
    assert np.abs(after).max() < 1.5 * step, after / step                   # within about a code everywhere
    assert np.abs(before).max() > 3 * np.abs(after).max(), (before / step, after / step)
    noise = np.sum((cpu_shared - cpu_own) ** 2)
    assert 10 * np.log10(np.sum(cpu_own ** 2) / noise) > 60                  # CPU QDQ: one rounding fewer
