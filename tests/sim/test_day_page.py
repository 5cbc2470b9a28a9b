"""The scripted day kept running (`--keep-running`): the web HMI it serves shows the day's safety step in a real
headless Chromium, with the actions Safety asked for; a screenshot is kept in build/artifacts/hmi-day.png."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, free_port
from tests.hmi.cdp import Browser

ARTIFACT = ROOT / "build" / "artifacts" / "hmi-day.png"


def wait_for_line(proc: subprocess.Popen, pattern: str, seen: list[str], timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"{pattern!r} not printed; the simulation said:\n{''.join(seen)}")


async def test_the_page_shows_the_days_safe_exit_warning(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "sim", "--with-server", "--target", f"127.0.0.1:{port}",
           "--steps", "exit", "--keep-running", "--hmi-listen", "127.0.0.1:0", "--fps", "4",
           "--set", f"server.data_dir={tmp_path / 'data'}", "--set", "server.metrics_listen=127.0.0.1:0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        url = wait_for_line(proc, r"web HMI: (http://127\.0\.0\.1:\d+/)", seen, 300).group(1)
        wait_for_line(proc, r"scenario: 1/1 steps passed", seen, 200)
        wait_for_line(proc, r"keeps running on", seen, 30)
        async with Browser(tmp_path / "chromium") as page:
            await page.goto(url)
            await page.wait_for("document.querySelector('#events li[data-kind=\"safety.safe_exit_warning\"]') "
                                "!== null", timeout=60, what="the safe-exit warning on the timeline")
            await page.wait_for("document.querySelector('.tile[data-camera=\"left\"]') !== null", timeout=30,
                                what="the left camera's tile")
            timeline = await page.evaluate("document.getElementById('events').innerText")
            assert "bicycle is approaching" in timeline and "actions: " in timeline and "door_lock_hold" in timeline
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(ARTIFACT)
        assert proc.poll() is None, "the service stopped although --keep-running was given"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert ARTIFACT.stat().st_size > 10_000
