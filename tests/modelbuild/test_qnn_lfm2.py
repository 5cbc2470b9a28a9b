"""The tiny LFM2 prefill and decode graphs (the LM helper's writer, `replace` state mode) quantized W4A16
with the init_overrides recipe, run on the QNN HTP emulator with CPU fallback disabled; SQNR reported."""
from __future__ import annotations

import json

import numpy as np
import pytest

import onnx

from service.modelbuild import decoder, lfm2, qdq, weight_codec
from service.modelbuild.tiny import write_tiny_lfm2
from service.runtime.backends import create_session


L, CHUNK, VOCAB = 32, 8, 256
SQNR_FLOOR_DB = {"w4a16": 8.0, "w8a16": 17.0}   # random weights, a worst case: measured ~10-13 dB W4, more at W8


def _feed(spec, embeds, positions, states):
    """Graph inputs for `replace` mode: additive mask over cache slots, one-hot cache writes (slot = position)."""
    T = len(positions)
    mask = np.full((1, 1, T, L), decoder.MASK_VALUE, np.float32)
    write = np.zeros((1, 1, L, T), np.float32)
    for t, p in enumerate(positions):
        mask[0, 0, t, :p + 1] = 0.0
        write[0, 0, p, t] = 1.0
    return {"inputs_embeds": embeds[None].astype(np.float32), "position_ids": np.asarray([positions], np.int64),
            "token_mask": np.ones((1, T), np.float32), "attention_mask": mask, "cache_write": write, **states}


def _trajectories(spec, weights, prefill, decode, seeds, decode_steps):
    """Feeds seen along greedy-free random-token runs of the float graphs (states fed back)."""
    entries = decoder.state_entries(spec, 1, "replace")
    prefill_feeds, decode_feeds = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, VOCAB, CHUNK + decode_steps)
        states = {e["input"]: np.zeros(e["shape"], np.float32) for e in entries}
        feed = _feed(spec, weights["embed"][tokens[:CHUNK]], list(range(CHUNK)), states)
        prefill_feeds.append(feed)
        outs = prefill.run(None, feed)
        names = [o.name for o in prefill.get_outputs()]
        for step in range(decode_steps):
            states = {e["input"]: outs[names.index(e["output"])] for e in entries}
            pos = CHUNK + step
            feed = _feed(spec, weights["embed"][tokens[pos:pos + 1]], [pos], states)
            decode_feeds.append(feed)
            outs = decode.run(None, feed)
            names = [o.name for o in decode.get_outputs()]
    return prefill_feeds, decode_feeds


@pytest.fixture(scope="module")
def tiny_lfm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qnn_lfm2")
    checkpoint = write_tiny_lfm2(root / "ckpt", max_positions=L, vocab=VOCAB, embedding_norm_noise=0)
    model = lfm2.load_lfm2(checkpoint, context_length=L, require_tokenizer=False)
    paths = {}
    for name, tokens in (("prefill", CHUNK), ("decode", 1)):
        paths[name] = root / f"decoder_{name}.float.onnx"
        decoder.build_decoder(model.spec, model.weights, tokens, "replace", name=f"lfm2_{name}").save(paths[name])
    prefill, decode = (create_session(paths[n], "cpu") for n in ("prefill", "decode"))
    calib = _trajectories(model.spec, model.weights, prefill, decode, seeds=range(8), decode_steps=16)
    held = _trajectories(model.spec, model.weights, prefill, decode, seeds=[1000], decode_steps=3)
    return {"root": root, "paths": paths, "float": {"prefill": prefill, "decode": decode},
            "calib": dict(zip(("prefill", "decode"), calib)), "held": dict(zip(("prefill", "decode"), held))}


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_lfm2_w4a16_and_w8a16_run_wholly_on_the_htp_emulator(tiny_lfm2, graph):
    float_path = tiny_lfm2["paths"][graph]
    reports = []
    for precision in ("w4a16", "w8a16"):
        qdq_path = qdq.quantize_qdq(float_path, tiny_lfm2["root"] / f"decoder_{graph}.{precision}.onnx",
                                    tiny_lfm2["calib"][graph], precision)
        encodings = weight_codec.weight_encodings(onnx.load(str(qdq_path)))
        assert encodings and all(e.per_channel for e in encodings)
        layer_matmuls = [e for e in encodings if e.op == "MatMul" and e.weight.startswith("layers.")]
        # W4A16: every layer MatMul on LPBQ (int4 blocks of 64 under uint8 block scales), the head int8
        want = ("int4", qdq.LPBQ_BLOCK) if precision == "w4a16" else ("int8", None)
        assert layer_matmuls and all((e.dtype, e.block_size) == want for e in layer_matmuls), layer_matmuls[:2]
        assert all(e.dtype == "int8" for e in encodings if e.weight.startswith("lm_head"))
        htp = create_session(qdq_path, "qnn-emulator", disable_cpu_fallback=True,
                             context_cache=tiny_lfm2["root"] / "qnn-cache", model_name=f"lfm2_{graph}.{precision}")
        cpu = create_session(qdq_path, "cpu")
        for backend, session in (("qnn-emulator", htp), ("cpu", cpu)):
            report = qdq.evaluate(tiny_lfm2["float"][graph], session, tiny_lfm2["held"][graph],
                                  component=f"decoder_{graph}", precision=precision, backend=backend, output="logits")
            reports.append(report)
    print(json.dumps({f"lfm2_{graph}": [r.to_dict() for r in reports]}))
    for htp_report, cpu_report in (reports[0:2], reports[2:4]):
        assert htp_report.sqnr_db > SQNR_FLOOR_DB[htp_report.precision], htp_report.to_dict()
        # The emulator is bit-faithful to the HTP and lands where ORT's CPU QDQ simulation does.
        assert abs(htp_report.sqnr_db - cpu_report.sqnr_db) < 1.0, (htp_report.to_dict(), cpu_report.to_dict())
    assert reports[2].sqnr_db > reports[0].sqnr_db + 6.0      # 8-bit weights clearly beat 4-bit ones
