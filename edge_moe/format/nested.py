"""Nested (matryoshka) bit-plane quantization of one matrix: both schemes, in numpy (the format oracle).

A matrix W [O, N] is cut into groups of G inputs (the last group is zero-padded to G). It is stored
as 8 bit-planes packed along N (bit j of byte i holds input 8*i + j) plus per-(row, group) fp16
metadata. Reading the first b planes gives a b-bit weight, 2 <= b <= 8.

Vocabulary, used the same way everywhere:
- bits: an expert matrix's precision, BASE_BITS..MAX_BITS (2..8); b bits use planes 0..b-1.
- chunk: plane c of every matrix of one expert with its metadata (format.layout); b bits = b chunks.
- level: what the file checksums and reads as one step: level 1 is the 2-bit base (chunks 0-1), level
  k > 1 adds chunk k, so b bits are levels 1..bits_to_level(b).
- unit: one slot of the runtime's arena, holding one chunk (runtime.arena, runtime.expert_cache).

Every scheme dequantizes as  w = sum_p coef[p] * bit_p + offset  per group, so that
y[o] = sum_g ( sum_p coef[p,o,g] * dot(P_p[o,g,:], x_g) + offset[o,g] * sum(x_g) )  (DESIGN.md 1).

- "msb" (MatQuant / Any-Precision slicing): one asymmetric 8-bit code q; plane p is bit 7-p.
  A b-bit prefix is decoded at the centre of its bucket of 8-bit codes, which is round-to-nearest
  without reading the next plane: coef[p] = scale * 2^(7-p), offset = min + scale * (2^(8-b) - 1) / 2.
- "mwq" (D2MoE residual planes): a 2-bit asymmetric base (planes 0, 1 = code bits 1, 0), then
  sign planes of the remaining residual with a per-group mean-|r| scale alpha:
  coef = (2s, s, 2a_2, 2a_3, ...), offset = min - sum(alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("msb", "mwq")
BASE_BITS = 2
MAX_BITS = 8
WORD_BITS = 64  # group sizes are whole 64-bit words so kernels can use popcount on words


@dataclass
class NestedMatrix:
    """Quantized matrix: planes [P, O, Npad/8] uint8, scale/minimum [O, ng] fp16, alpha [P-2, O, ng]."""

    scheme: str
    shape: tuple[int, int]  # (O, N)
    group: int  # G
    planes: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray
    alpha: np.ndarray | None = None  # mwq only

    @property
    def num_planes(self) -> int:
        return self.planes.shape[0]


def bits_to_level(bits: int) -> int:
    """The last level of a bit width (2 bits -> level 1, 8 bits -> 7): also the levels it takes."""
    return int(bits) - BASE_BITS + 1


def chunk_level(chunk: int) -> int:
    """The level that holds a chunk (chunks 0 and 1 are both level 1)."""
    return bits_to_level(max(int(chunk) + 1, BASE_BITS))


def check_group(group: int) -> None:
    if group <= 0 or group % WORD_BITS:
        raise ValueError(f"group size {group} must be a positive multiple of {WORD_BITS}")


def num_groups(n: int, group: int) -> int:
    return -(-n // group)


def _grouped(w: np.ndarray, group: int) -> np.ndarray:
    """W [O, N] -> [O, ng, G] float32 with NaN in the padding of the last group."""
    o, n = w.shape
    ng = num_groups(n, group)
    out = np.full((o, ng * group), np.nan, dtype=np.float32)
    out[:, :n] = w
    return out.reshape(o, ng, group)


def _range(wg: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group fp16 (scale, minimum) for an asymmetric code with `steps` steps."""
    lo = np.nanmin(wg, axis=-1)
    hi = np.nanmax(wg, axis=-1)
    minimum = lo.astype(np.float16)
    scale = ((hi - minimum.astype(np.float32)) / steps).astype(np.float16)
    tiny = np.float16(6.1e-5)  # smallest normal fp16: constant groups still decode exactly-ish
    return np.maximum(scale, tiny), minimum


def _codes(wg: np.ndarray, scale: np.ndarray, minimum: np.ndarray, top: int) -> np.ndarray:
    q = np.rint((wg - minimum[..., None].astype(np.float32)) / scale[..., None].astype(np.float32))
    q = np.nan_to_num(q, nan=0.0)
    return np.clip(q, 0, top).astype(np.uint8)


def _pack(bits: np.ndarray) -> np.ndarray:
    """[..., O, ng, G] 0/1 -> [..., O, Npad/8] uint8, little bit order along N."""
    flat = bits.reshape(*bits.shape[:-2], bits.shape[-2] * bits.shape[-1])
    return np.packbits(flat.astype(np.uint8), axis=-1, bitorder="little")


def quantize(w: np.ndarray, scheme: str, group: int = 128) -> NestedMatrix:
    """Quantize W [O, N] into all 8 planes of the given scheme."""
    check_group(group)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    wg = _grouped(np.asarray(w, dtype=np.float32), group)
    if scheme == "msb":
        return _quantize_msb(wg, w.shape, group)
    return _quantize_mwq(wg, w.shape, group)


def msb_codes(w: np.ndarray, group: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8-bit msb codes of W [O, N] as bytes, before they are split into planes: (q [O, ng, G]
    uint8, zero in the padding; scale, minimum [O, ng] fp16), w = scale * q + minimum."""
    check_group(group)
    wg = _grouped(np.asarray(w, dtype=np.float32), group)
    scale, minimum = _range(wg, 255)
    return _codes(wg, scale, minimum, 255), scale, minimum


NIBBLE_BLOCK = 64  # weights per block of to_nibbles: one 32-byte load on AVX2 (kernels.simd._dot_nib128)


def to_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes <= 15 [O, n] (n a multiple of 64) two per byte [O, n/2]: per block of 64, byte j holds code
    j in its low nibble and code j + 32 in its high one (llama.cpp's Q4_0 does the same per 32)."""
    blocks = q.reshape(q.shape[0], -1, 2, NIBBLE_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def nibbles_to_bytes(codes: np.ndarray) -> np.ndarray:
    """The inverse of to_nibbles: [O, n/2] -> codes [O, n] uint8."""
    blocks = codes.reshape(codes.shape[0], -1, 1, NIBBLE_BLOCK // 2)
    return np.concatenate([blocks & 0x0F, blocks >> 4], axis=2).reshape(codes.shape[0], -1)


def _quantize_msb(wg: np.ndarray, shape, group: int) -> NestedMatrix:
    scale, minimum = _range(wg, 255)
    q = _codes(wg, scale, minimum, 255)  # [O, ng, G]
    bits = np.stack([(q >> (7 - p)) & 1 for p in range(MAX_BITS)])
    return NestedMatrix("msb", tuple(shape), group, _pack(bits), scale, minimum)


def _quantize_mwq(wg: np.ndarray, shape, group: int) -> NestedMatrix:
    scale, minimum = _range(wg, 3)
    q = _codes(wg, scale, minimum, 3)
    valid = ~np.isnan(wg)
    base = scale[..., None].astype(np.float32) * q + minimum[..., None].astype(np.float32)
    residual = np.where(valid, wg - base, 0.0)
    planes, alphas = [(q >> 1) & 1, q & 1], []
    for _ in range(MAX_BITS - BASE_BITS):
        sign = residual >= 0
        count = np.maximum(valid.sum(-1), 1)
        alpha = (np.abs(residual).sum(-1) / count).astype(np.float16)  # mean |r|: LS-optimal for +-1
        residual = residual - np.where(sign, 1.0, -1.0) * alpha[..., None].astype(np.float32)
        residual = np.where(valid, residual, 0.0)
        planes.append(sign & valid)
        alphas.append(alpha)
    return NestedMatrix("mwq", tuple(shape), group, _pack(np.stack(planes)), scale, minimum,
                        np.stack(alphas))


def group_coefficients(m: NestedMatrix, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef [b, O, ng], offset [O, ng]) float32 so that w = sum_p coef[p] * bit_p + offset."""
    if not BASE_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {BASE_BITS}..{MAX_BITS}, got {bits}")
    if m.num_planes < bits:
        raise ValueError(f"matrix holds {m.num_planes} planes, {bits} bits requested")
    s = m.scale.astype(np.float32)
    lo = m.minimum.astype(np.float32)
    if m.scheme == "msb":
        coef = np.stack([s * float(2 ** (7 - p)) for p in range(bits)])
        return coef, lo + s * ((2 ** (MAX_BITS - bits) - 1) / 2)
    n_sign = bits - BASE_BITS
    a = m.alpha[:n_sign].astype(np.float32) if n_sign else np.zeros((0, *s.shape), np.float32)
    coef = np.concatenate([np.stack([2 * s, s]), 2 * a])
    return coef, lo - a.sum(0)


def unpack_planes(planes: np.ndarray, group: int) -> np.ndarray:
    """[P, O, Npad/8] uint8 -> [P, O, ng, G] float32 of 0/1."""
    bits = np.unpackbits(planes, axis=-1, bitorder="little").astype(np.float32)
    return bits.reshape(*planes.shape[:2], -1, group)


def dequantize(m: NestedMatrix, bits: int) -> np.ndarray:
    """The b-bit weight W_b [O, N] float32 from the first b planes."""
    coef, offset = group_coefficients(m, bits)
    planes = unpack_planes(m.planes[:bits], m.group)  # [b, O, ng, G]
    w = np.einsum("pog,pogk->ogk", coef, planes) + offset[..., None]
    o, n = m.shape
    return w.reshape(o, -1)[:, :n]


def quantize_rtn(w: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Baseline: independent asymmetric round-to-nearest at `bits`, dequantized (not nested)."""
    wg = _grouped(np.asarray(w, dtype=np.float32), group)
    top = 2**bits - 1
    scale, minimum = _range(wg, top)
    q = _codes(wg, scale, minimum, top).astype(np.float32)
    out = q * scale[..., None].astype(np.float32) + minimum[..., None].astype(np.float32)
    return out.reshape(w.shape[0], -1)[:, : w.shape[1]]
