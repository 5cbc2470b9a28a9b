"""`incar sim --with-server`, what `make run` does: the scripted day (shortened here: the driver enrolled and
greeted by face on the side camera, Car Finder with its routed question, and Safety's safe-exit warning) and the
free-running loop the compose services use."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.conftest import ROOT, free_port


def run_sim(tmp_path, *extra: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "sim", "--with-server", "--target", f"127.0.0.1:{port}",
           "--set", f"server.data_dir={tmp_path / 'data'}", "--set", "server.metrics_listen=127.0.0.1:0", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), INCAR_PROFILE_KEY="")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out_file = tmp_path / "sim.out"
    out_file.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    return result, f"see {out_file}"


def test_the_scripted_day_checks_each_step_and_keeps_server_logs_in_a_file(tmp_path):
    result, where = run_sim(tmp_path, "--steps", "enrol,greet,park,exit", "--hmi-listen", "127.0.0.1:0", "--fps", "4")
    out = result.stdout
    assert re.search(r"web HMI: http://127\.0\.0\.1:\d+/", out), where
    step_lines = re.findall(r"step +\d/4 (\w+) (PASS|FAIL) \(", out)
    assert [name for name, _ in step_lines] == ["enrol", "greet", "park", "exit"], where
    assert all(mark == "PASS" for _, mark in step_lines), where
    assert "scenario: 4/4 steps passed" in out and result.returncode == 0, where
    # In sentry mode's power rung, on the side camera the driver walks towards: by face, not only the fob.
    assert "greet PASS" in out and "greeted by face" in out, where
    assert "level='U1' bay='230'" in out and "[car_finder]" in out, where   # the sign read at parking, answered
    assert "safety.safe_exit_warning" in out and "door_lock_hold" in out, where
    # The timeline is readable: no server JSON on the console; the log file named on it holds JSON lines.
    assert not any(line.startswith("{") for line in out.splitlines()), where
    log = tmp_path / "data" / "logs" / "incar-serve.log"
    assert f"server logs (JSON lines): {log}" in out, where
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(r.get("event") == "serving" for r in records), where


def test_an_unknown_step_is_refused_by_name(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service.cli", "sim", "--steps", "park,fly"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "unknown step(s) fly" in result.stderr


def test_a_bad_setting_is_refused_before_the_server_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service.cli", "sim", "--with-server", "--set", "data_dir=/tmp/x"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data_dir: unknown section" in result.stderr and "starting incar serve" not in result.stdout


def test_free_run_streams_parks_and_answers(tmp_path):
    """The endless loop (compose's camera-sim and hmi services), bounded by --duration."""
    result, where = run_sim(tmp_path, "--free-run", "--duration", "25", "--fps", "2", "--ask-every", "10",
                            "--server-logs", "console", "--set", "server.log_level=warning")
    out = result.stdout
    assert result.returncode == 0, where
    for expected in ("server is SERVING", "frames accepted", "vehicle.locked", "sentinel.armed", "answer"):
        assert expected in out, f"{expected!r} missing from the simulation's output; {where}"
