"""`incar config show` prints what the service would run with, each key with its meaning; `profile-key` makes a
key the service accepts; a bad key stops the start with a message, not a traceback."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def incar(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INCAR_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120)


def test_show_follows_every_source_in_order(tmp_path):
    config = tmp_path / "incar.yaml"
    config.write_text("cameras:\n  model_size: 512\n  ring_seconds: 4\n")
    shown = incar("config", "show", "--json", "-c", str(config), "--set", "cameras.ring_seconds=6",
                  env={"INCAR_CAMERAS__WATCHDOG_TIMEOUT_SECONDS": "5"})
    assert shown.returncode == 0, shown.stderr
    settings = json.loads(shown.stdout)                        # stdout is one JSON object
    assert settings["cameras.model_size"]["value"] == 512       # YAML
    assert settings["cameras.ring_seconds"]["value"] == 6       # --set wins over YAML
    assert settings["cameras.watchdog_timeout_seconds"]["value"] == 5.0    # environment
    assert settings["server.listen"]["value"] == "127.0.0.1:50051"         # embedded default
    assert "resized" in settings["cameras.model_size"]["meaning"]
    described = sum(1 for v in settings.values() if v["meaning"])
    assert described / len(settings) > 0.7, f"only {described} of {len(settings)} keys say what they mean"


def test_show_text_and_section_filter_and_secrets():
    key = base64.urlsafe_b64encode(bytes(32)).decode()
    shown = incar("config", "show", "skills.greeter", "--set", f"skills.greeter.profile_key={key}")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines and all(line.startswith("skills.greeter.") for line in lines)
    assert key not in shown.stdout and 'skills.greeter.profile_key' in shown.stdout and '"(set)"' in shown.stdout


def test_bad_setting_is_named():
    shown = incar("config", "show", "--set", "cameras.model_size=huge")
    assert shown.returncode == 2 and shown.stderr.startswith("incar: configuration error: cameras.model_size")


def test_profile_key_round_trip(tmp_path):
    made = incar("config", "profile-key", "--json")
    key = json.loads(made.stdout)["profile_key"]
    assert len(base64.urlsafe_b64decode(key)) == 32
    assert incar("config", "show", "skills.greeter", env={"INCAR_PROFILE_KEY": key}).returncode == 0
    bad = incar("serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
                env={"INCAR_PROFILE_KEY": "not-a-key"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "INCAR_PROFILE_KEY" in bad.stderr and "incar config profile-key" in bad.stderr
