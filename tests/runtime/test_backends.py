"""Backends: cpu / qnn-emulator sessions, readable errors, node placement gauges, HTP performance mode, and
the machine's QNN target (`runtime.qnn_target` or the SoC's own) with its cache under the data directory."""
from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.config import ConfigError, load_config
from service.modelbuild.graph import GraphBuilder
from service.runtime import backends, qnn_context
from service.runtime.backends import BackendError, create_session


def _gauge(backend, placement, model):
    labels = {"backend": backend, "placement": placement, "model": model}
    return REGISTRY.get_sample_value("incar_runtime_nodes", labels)


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


@pytest.fixture
def site(tmp_path):
    """A QNN site for the test (cache under its tmp data dir); the process default comes back afterwards."""
    before = qnn_context.current()
    yield qnn_context.configure("", tmp_path / "data" / "qnn-cache")
    qnn_context.configure(before.target, before.cache_dir)


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
def test_qnn_htp_is_refused_on_an_emulator_host(graphs):
    with pytest.raises(BackendError, match="only an emulator"):
        create_session(graphs / "plain.onnx", "qnn-htp")


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


def test_the_soc_picks_its_target(tmp_path):
    machine = tmp_path / "machine"
    machine.write_text("SA8295P\n")
    assert qnn_context.detect_target(machine, emulator=False) == "sa8295p-v68"
    machine.write_text("SM8650\n")       # a SoC the project builds no context binaries for: QNN's defaults
    assert qnn_context.detect_target(machine, emulator=False) == "emulator"
    assert qnn_context.detect_target(tmp_path / "absent", emulator=False) == "emulator"
    assert qnn_context.detect_target(machine, emulator=True) == "emulator"


def test_the_context_cache_lives_under_the_data_dir_for_the_sites_target(graphs, site, tmp_path):
    assert site.cache_dir == tmp_path / "data" / "qnn-cache"
    create_session(graphs / "plain.onnx", "qnn-emulator", disable_cpu_fallback=True, model_name="plain-site")
    compiled = list(site.cache_dir.glob(f"{site.target}/plain.*/plain_ctx.onnx"))
    assert len(compiled) == 1, sorted(site.cache_dir.rglob("*"))
    assert _gauge("qnn-emulator", "npu", "plain-site") == 3


def test_a_configured_target_overrides_the_soc_and_is_checked(graphs, site, tmp_path):
    chosen = qnn_context.configure("sa8295p-v68", tmp_path / "cache")
    create_session(graphs / "plain.onnx", "qnn-emulator", disable_cpu_fallback=True)
    assert list((chosen.cache_dir / "sa8295p-v68").glob("plain.*/plain_ctx.onnx"))
    with pytest.raises(ValueError, match="expected one of emulator, sa8295p-v68"):
        qnn_context.configure("sm9999")


def test_runtime_qnn_target_in_config_names_the_key():
    assert load_config(None, overrides=["runtime.qnn_target=sa8295p-v68"]).runtime.qnn_target == "sa8295p-v68"
    with pytest.raises(ConfigError, match=r"runtime\.qnn_target: expected one of emulator, sa8295p-v68 .* got 'v99'"):
        load_config(None, overrides=["runtime.qnn_target=v99"])
