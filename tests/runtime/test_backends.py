"""Backends: cpu / qnn-emulator sessions, readable errors, node placement gauges, HTP performance mode."""
from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.modelbuild.graph import GraphBuilder
from service.runtime import backends
from service.runtime.backends import BackendConfig, BackendError, create_session, open_with_fallback


def _gauge(backend, placement, model):
    return REGISTRY.get_sample_value("incar_runtime_nodes", {"backend": backend, "placement": placement, "model": model})


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    g = GraphBuilder("plain")
    x = g.input("x", "float32", [2, 2])
    g.output(g.op("Mul", [g.op("Add", [x, g.const(np.ones((2, 2)))]), x]), "y", "float32", [2, 2])
    g.save(root / "plain.onnx")
    # Det has no HTP kernel: the node stays on the CPU when fallback is allowed.
    g = GraphBuilder("mixed")
    x = g.input("x", "float32", [2, 2])
    y = g.op("Mul", [g.op("Add", [x, g.const(np.ones((2, 2)))]), x])
    g.output(g.op("Det", [y]), "det", "float32", [])
    g.save(root / "mixed.onnx")
    return root


def test_cpu_session_runs_and_exports_placement(graphs):
    session = create_session(graphs / "plain.onnx", "cpu", model_name="plain-cpu")
    out = session.run(None, {"x": np.eye(2, dtype=np.float32)})[0]
    np.testing.assert_allclose(out, (np.eye(2) + 1) * np.eye(2))
    assert _gauge("cpu", "cpu", "plain-cpu") == 3 and _gauge("cpu", "npu", "plain-cpu") == 0


def test_readable_errors(graphs, tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'gpu'"):
        create_session(graphs / "plain.onnx", "gpu")
    with pytest.raises(BackendError, match="does not exist"):
        create_session(tmp_path / "nope.onnx", "cpu")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="cpu: cannot open broken.onnx"):
        create_session(tmp_path / "broken.onnx", "cpu")
    with pytest.raises(BackendError, match="performance mode 'turbo'"):
        create_session(graphs / "plain.onnx", "qnn-emulator", performance_mode="turbo")


@pytest.mark.skipif(not backends.is_emulator_host(), reason="x86_64 hosts only carry the HTP emulator")
def test_qnn_htp_is_refused_on_an_emulator_host_and_falls_back(graphs):
    with pytest.raises(BackendError, match="only an emulator"):
        create_session(graphs / "plain.onnx", "qnn-htp")
    loaded = open_with_fallback(graphs / "plain.onnx", BackendConfig(backend="qnn-htp", fallback_backend="cpu"))
    assert loaded.backend == "cpu" and "only an emulator" in loaded.fallback_reason
    with pytest.raises(BackendError):
        open_with_fallback(graphs / "plain.onnx", BackendConfig(backend="qnn-htp", fallback_backend=""))


def test_placement_counts_nodes_left_on_the_cpu(graphs, tmp_path):
    session = create_session(graphs / "mixed.onnx", "qnn-emulator", context_cache=tmp_path, model_name="mixed")
    assert session.run(None, {"x": np.eye(2, dtype=np.float32)})[0] == pytest.approx(np.linalg.det([[2, 0], [0, 2]]))
    assert _gauge("qnn-emulator", "cpu", "mixed") == 1 and _gauge("qnn-emulator", "npu", "mixed") == 3
    with pytest.raises(BackendError, match=r"not supported on the HTP: det_\d+ \(Det\)"):
        create_session(graphs / "mixed.onnx", "qnn-emulator", disable_cpu_fallback=True, context_cache=tmp_path)


def test_performance_mode_at_load_and_live(graphs, tmp_path):
    session = create_session(graphs / "plain.onnx", "qnn-emulator", disable_cpu_fallback=True,
                             performance_mode="power_saver", context_cache=tmp_path)
    for mode in ("burst", "balanced", "low_power_saver"):
        backends.set_performance_mode(session, mode)
        out = session.run(None, {"x": np.eye(2, dtype=np.float32)})[0]
        np.testing.assert_allclose(out, (np.eye(2) + 1) * np.eye(2), atol=1e-2)   # the HTP runs float as fp16
    with pytest.raises(BackendError, match="unknown HTP performance mode"):
        backends.set_performance_mode(session, "ludicrous")
    with pytest.raises(BackendError, match="does not run on QNN"):
        backends.set_performance_mode(create_session(graphs / "plain.onnx", "cpu"), "burst")


def test_backend_config_validation():
    assert BackendConfig().validate().backend == "cpu"
    for kwargs, key in [({"backend": "tpu"}, "backend"), ({"performance_mode": "max"}, "performance_mode"),
                        ({"target": "sm9999"}, "target"), ({"threads": -1}, "threads"),
                        ({"fallback_backend": "x"}, "fallback_backend")]:
        with pytest.raises(ValueError, match=f"^{key}:"):
            BackendConfig(**kwargs).validate()
