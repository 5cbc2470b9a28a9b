"""Hostile inputs built in the test, byte by byte: a progressive-JPEG scan bomb."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _eob_run_scan(blocks: int) -> bytes:
    """Entropy-coded data for one AC scan in which every block is an end-of-band run (EOBn with n <= 14, coded
    with a one-symbol Huffman table whose only code is '0')."""
    bits, left = "", blocks
    while left > 0:
        run = min(left, 32767)
        n = run.bit_length() - 1
        bits += "0" + (format(run - (1 << n), f"0{n}b") if n else "")
        left -= run
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        byte = int(bits[i:i + 8], 2)
        out.append(byte)
        if byte == 0xFF:
            out.append(0)          # byte stuffing, as in any entropy-coded segment
    return bytes(out)


def progressive_scan_bomb(size: int = 4096, scans: int = 30_000) -> bytes:
    """A valid progressive JPEG (size x size, greyscale) with `scans` extra AC scans of a few bytes each: about
    1 MB for 30,000 scans, and every scan is a full pass over all blocks for the decoder (tens of seconds)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint8), "L").save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    end = data.rindex(b"\xff\xd9")
    blocks = ((size + 7) // 8) ** 2
    # DHT: AC table 1 with one symbol (0xE0, EOB14) of code length 1
    table = b"\xff\xc4" + (2 + 1 + 16 + 1).to_bytes(2, "big") + b"\x11" + bytes([1] + [0] * 15) + b"\xe0"
    # SOS: one component (id 1, tables 0/1), spectral selection 63..63, successive approximation 0
    scan = b"\xff\xda\x00\x08\x01\x01\x01\x3f\x3f\x00" + _eob_run_scan(blocks)
    return data[:end] + table + scan * scans + data[end:]
