"""The task commands a newcomer types (`incar greeter|carfinder|sentinel|safety ...`) against `incar serve`."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import cv2

from tests.conftest import PHOTOS, ROOT
from tests.skills.faces import dlib_face_embedder


def incar(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args[:1], "--target", server.target, *args[1:]],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)


def one_face(tmp_path) -> str:
    photo = cv2.imread(str(PHOTOS / "faces3.jpg"))
    x0, y0, x1, y1 = (int(v) for v in dlib_face_embedder(photo)[0].box)
    pad = (x1 - x0) // 2
    crop = photo[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad]
    path = tmp_path / "driver.jpg"
    cv2.imwrite(str(path), crop)
    return str(path)


def test_skill_tasks_from_the_command_line(server_process, tmp_path, monkeypatch):
    monkeypatch.setenv("INCAR_PROFILE_KEY", base64.urlsafe_b64encode(bytes(range(32))).decode())
    server = server_process().start(timeout=120)

    status = incar(server, "sentinel", "--json", "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"].startswith("SENTINEL_STATE_")

    assert incar(server, "greeter", "list").stdout.strip() == "(none)"
    refused = incar(server, "greeter", "enrol", "--name", "Ana", "--image", one_face(tmp_path))
    assert refused.returncode == 1 and "consent" in refused.stderr.lower()
    enrolled = incar(server, "greeter", "--json", "enrol", "--name", "Ana", "--image", one_face(tmp_path),
                     "--consent")
    assert enrolled.returncode == 0, enrolled.stderr
    profile = json.loads(enrolled.stdout)
    listed = incar(server, "greeter", "--json", "list")
    assert [p["name"] for p in json.loads(listed.stdout)["profiles"]] == ["Ana"]
    assert incar(server, "greeter", "forget", profile["profile_id"]).returncode == 0
    assert incar(server, "greeter", "list").stdout.strip() == "(none)"

    where = incar(server, "carfinder", "where")      # never parked here: refused with the reason, not a traceback
    assert where.returncode in (0, 1) and "Traceback" not in where.stderr
    if where.returncode == 1:
        assert where.stderr.startswith("incar carfinder where: ")

    safety = incar(server, "safety", "--json", "status")
    assert safety.returncode == 0 and json.loads(safety.stdout).get("active", []) == []
    missing = incar(server, "safety", "ack", "987654")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
