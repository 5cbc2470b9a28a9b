"""GGUF quantized blocks copied into MatMulNBits layouts exactly (never re-rounded).

MatMulNBits reconstructs w = scale * (code - 2^(bits-1)) per block (default zero point). Each GGUF type maps as
(shared/quant-notes.md has the measurements):
- Q4_0  w = d*(q-8):            bits 4, block 32, code q, scale d.
- Q4_1  w = d*q + m:            bits 4, block 32, code q, scale d, plus a per-block offset m + 8d.
- Q5_0  w = d*(q-16):           bits 8, block 32, code q+112, scale d.
- Q5_1  w = d*q + m:            bits 8, block 32, code q+112, scale d, offset m + 16d.
- Q8_0  w = d*q (q int8):       bits 8, block 32, code q+128, scale d.
- Q4_K  w = d*sc*q - dmin*m:    bits 4, block 32 (the sub-blocks), scale d*sc, offset 8*d*sc - dmin*m.
- Q5_K  (5-bit q, as Q4_K):     bits 8, block 32, code q+112, scale d*sc, offset 16*d*sc - dmin*m.
- Q6_K  w = d*sc*(q-32):        bits 8, block 16, code q+96, scale d*sc.
An offset cannot live in MatMulNBits' uint8 zero point (-m/d is not an integer) and a float zero point leaves the
packed kernel (2.0 ms vs 13 us per layer at M=1), so the graph adds it as (block sums of x) @ offsets: exact, and
the packed kernel stays. Other types (Q2_K, Q3_K, IQ*, ...) cannot be held exactly: `TranscodeError`, naming the
tensor and type, unless the caller asked for re-quantization.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256
FLOAT_TYPES = ("F32", "F16", "BF16")
EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


class TranscodeError(ValueError):
    """A GGUF tensor whose type MatMulNBits cannot hold exactly."""


@dataclass
class NBitsWeight:
    """A [N, K] weight as MatMulNBits holds it: w = scales * (codes - 2^(bits-1)) (+ offsets), per block along K."""
    codes: np.ndarray            # uint8 [N, K], each < 2^bits
    scales: np.ndarray           # float32 [N, K / block_size]
    offsets: np.ndarray | None   # float32 [N, K / block_size]: added to every weight of the block (mins)
    bits: int
    block_size: int
    source_type: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, k // self.block_size, self.block_size).astype(np.float32)
        w = self.scales[..., None] * (blocks - np.float32(1 << (self.bits - 1)))
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    def rows(self, index: np.ndarray) -> NBitsWeight:
        return NBitsWeight(self.codes[index], self.scales[index],
                           None if self.offsets is None else self.offsets[index],
                           self.bits, self.block_size, self.source_type)

    def packed(self) -> np.ndarray:
        """MatMulNBits input B: uint8 [N, K / block_size, block_size * bits / 8] (4-bit: element 2i low nibble)."""
        n, k = self.codes.shape
        codes = self.codes.reshape(n, k // self.block_size, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(codes)
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)

    def layout(self) -> tuple[int, int]:
        return self.bits, self.block_size


def concat_rows(parts: list[NBitsWeight]) -> NBitsWeight:
    """Stack weights along N (fused QKV / gate-up); they must share bits and block size."""
    if len({p.layout() for p in parts}) != 1:
        raise ValueError("concat_rows: parts differ in bits/block size")
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
    types = sorted({p.source_type for p in parts})
    return NBitsWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]), offsets,
                       parts[0].bits, parts[0].block_size, "+".join(types))


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes holding elements j (low) and j+16 (high) -> [..., 32] codes (GGUF Q4_0/Q4_1/Q5 order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits_q5(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes = 32 little-endian bits, bit j is element j's fifth bit."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12-byte 6-bit scale/min packing of Q4_K/Q5_K -> (sc [nb, 8], m [nb, 8]), as ggml's get_scale_min_k4."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(qtype: str, blocks: np.ndarray):
    """blocks [nb, type_size] uint8 -> (codes [nb, elems], scales [nb, sub], offsets [nb, sub] | None, bits, block)."""
    nb = blocks.shape[0]
    if qtype == "Q4_0":
        d = _f16(blocks[:, 0:2])
        return _nibbles_split(blocks[:, 2:]), d[:, None], None, 4, 32
    if qtype == "Q4_1":
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        return _nibbles_split(blocks[:, 4:]), d[:, None], (m + 8 * d)[:, None], 4, 32
    if qtype in ("Q5_0", "Q5_1"):
        has_min = qtype == "Q5_1"
        d = _f16(blocks[:, 0:2])
        at = 4 if has_min else 2
        q = _nibbles_split(blocks[:, at + 4:]) | (_high_bits_q5(blocks[:, at:at + 4]) << 4)
        offsets = (_f16(blocks[:, 2:4]) + 16 * d)[:, None] if has_min else None
        return q + np.uint8(112), d[:, None], offsets, 8, 32
    if qtype == "Q8_0":
        d = _f16(blocks[:, 0:2])
        q = blocks[:, 2:].view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d[:, None], None, 8, 32
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        scale, minimum = d[:, None] * sc, dmin[:, None] * mn               # [nb, 8] per 32-weight sub-block
        if qtype == "Q4_K":
            qs = blocks[:, 16:].reshape(nb, 4, 32)                         # chunk c: sub-blocks 2c (low), 2c+1 (high)
            q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, QK_K)
            return q, scale, 8 * scale - minimum, 4, 32
        qh = blocks[:, 16:48]                                              # bit j of byte i: element 32j + i
        qs = blocks[:, 48:].reshape(nb, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = (low | (high << 4)).reshape(nb, QK_K)
        return q + np.uint8(112), scale, 16 * scale - minimum, 8, 32
    if qtype == "Q6_K":
        ql, qh = blocks[:, :128].reshape(nb, 2, 64), blocks[:, 128:192].reshape(nb, 2, 32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)                # [nb, 2 halves, 128]
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        q = (low | (high << 4)).reshape(nb, QK_K)
        return q + np.uint8(96), d[:, None] * sc, None, 8, 16
    raise KeyError(qtype)


def transcode(name: str, qtype: str, data: np.ndarray, shape: tuple[int, int]) -> NBitsWeight:
    """One GGUF tensor's raw blocks (GGUFReader's `data`, [N, bytes per row]) -> NBitsWeight of `shape` [N, K]."""
    if qtype not in EXACT_TYPES:
        raise TranscodeError(f"{name}: GGUF type {qtype} cannot be held exactly by MatMulNBits "
                             f"(exact: {', '.join(EXACT_TYPES)}); rebuild with re-quantization to accept rounding")
    n, k = shape
    raw = np.ascontiguousarray(data, np.uint8).reshape(-1)
    import gguf

    elems, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if raw.size != n * k // elems * size:
        raise TranscodeError(f"{name}: {raw.size} bytes do not hold a {qtype} tensor of shape {list(shape)}")
    codes, scales, offsets, bits, block = _decode(qtype, raw.reshape(-1, size))
    sub = k // block
    return NBitsWeight(np.ascontiguousarray(codes.reshape(n, k), np.uint8),
                       np.ascontiguousarray(scales.reshape(n, sub), np.float32),
                       None if offsets is None else np.ascontiguousarray(offsets.reshape(n, sub), np.float32),
                       bits, block, qtype)
