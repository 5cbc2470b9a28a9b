"""`incar ask` / `incar chat` as a user runs them: a subprocess against a real Assistant on a real port."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from tests.runtime.test_assistant import Harness

ROOT = Path(__file__).resolve().parents[2]


async def incar(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", *args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=180)
    return proc.returncode, out.decode(), err.decode()


async def test_ask_streams_the_answer_and_prints_timings(tmp_path):
    image = tmp_path / "cabin.png"
    cv2.imwrite(str(image), np.full((48, 64, 3), 120, np.uint8))
    async with Harness() as h:
        code, out, err = await incar("ask", "Name one colour.", "--target", h.target, "--max-tokens", "12",
                                     "--image", str(image), "--no-tools")
        assert code == 0, err
        assert out.strip(), "no answer printed"
        assert "TTFT" in err and "tok/s" in err and "model" in err
        assert h.described == [1]     # the image went with the question


async def test_chat_keeps_asking_until_an_empty_line(tmp_path):
    async with Harness() as h:
        code, out, err = await incar("chat", "--target", h.target, "--max-tokens", "8", "--no-tools",
                                     stdin=b"Say hello.\nAnd once more?\n\n")
        assert code == 0, err
        assert out.count("> ") == 3 and err.count("TTFT") == 2


async def test_ask_reports_a_refusal_with_its_status(tmp_path):
    async with Harness() as h:
        code, _out, err = await incar("ask", "   ", "--target", h.target)
        assert code == 1 and "INVALID_ARGUMENT" in err and "question" in err
