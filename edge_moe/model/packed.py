"""Dense matrices packed at load (`dense_bits`): the LM head and projections at 4-8 bits instead of
bf16, halving or quartering the bytes each token reads. At 4 and 8 bits they are plain codes, nibbles
(NibbleLinear) or bytes (ByteLinear); at 5-7 nested bit-planes on the expert kernels. The dense part
is never read at fewer bits, so it need not pay for the planes' transposition (on AVX2 the plane GEMV
was compute-bound at about a third of the read bandwidth)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edge_moe.config import DENSE_BITS
from edge_moe.errors import UsageError
from edge_moe.format.layout import ExpertLayout, build_layout, pack_rows, unpack_matrix
from edge_moe.format.nested import dequantize, msb_codes, nibbles_to_bytes, quantize, to_nibbles

PACKED_SUFFIXES = (".qkv", ".o", ".shared_gate_up", ".shared_down", ".mlp_gate_up", ".mlp_down")
ROWS_PER_BLOCK = 1024  # quantization temporaries stay at tens of MB whatever the matrix size
PACK_THREADS = 2
SCHEME, GROUP = "msb", 128  # msb: the best nested scheme at every width (issue 2's table)


def check_dense_bits(bits: int) -> int:
    if int(bits) not in DENSE_BITS:
        raise UsageError(f"dense bits {bits} is not supported; choose one of {', '.join(map(str, DENSE_BITS))}")
    return int(bits)


def packs(name: str) -> bool:
    """Whether a dense tensor is packed: the embedding (rows dequantized on lookup), projections and
    the LM head; never norms, biases or routers (their top-k decides everything downstream)."""
    return name in ("embed", "lm_head") or name.endswith(PACKED_SUFFIXES)


class PackedLinear:
    """W [O, N] at `bits` as the first chunks of a one-matrix nested range; called as x @ W.T."""

    def __init__(self, layout: ExpertLayout, buf: np.ndarray, bits: int, backend):
        self.layout, self.buf, self.bits, self.backend = layout, buf, bits, backend
        self.shape = dict(layout.matrices)["w"]

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows W[ids] [T, N] float32 (an embedding lookup)."""
        m = unpack_matrix(self.layout, self.buf, "w", self.bits, rows=np.asarray(ids))
        return np.ascontiguousarray(dequantize(m, self.bits), np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        lead = x.shape[:-1]
        y = self.backend.nested_matmul(self.layout, self.buf, "w", x.reshape(-1, self.shape[1]), self.bits)
        return y.reshape(*lead, self.shape[0])


class ByteLinear(PackedLinear):
    """W [O, N] as 8-bit msb codes [O, ng*G] with float32 scale and minimum [O, ng] (the same values
    as the 8-bit planes of `quantize`); called as x @ W.T."""

    bits, matmul = 8, "byte_matmul"  # the backend op

    def __init__(self, codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, n: int, backend):
        self.codes, self.scale, self.minimum, self.backend = codes, scale, minimum, backend
        self.shape = (codes.shape[0], n)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes

    def byte_codes(self, i: np.ndarray) -> np.ndarray:
        """The codes of rows i, one per byte [len(i), ng*G]."""
        return self.codes[i]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        i = np.asarray(ids)
        o, ng = len(i), self.scale.shape[1]
        q = self.byte_codes(i).reshape(o, ng, -1).astype(np.float32)
        w = q * self.scale[i][..., None] + self.minimum[i][..., None]
        return np.ascontiguousarray(w.reshape(o, -1)[:, :self.shape[1]])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        matmul = getattr(self.backend, self.matmul)
        if x.ndim == 2:  # the decoder's rows: no reshapes
            return matmul(self.codes, self.scale, self.minimum, x)
        y = matmul(self.codes, self.scale, self.minimum, x.reshape(-1, self.shape[1]))
        return y.reshape(*x.shape[:-1], self.shape[0])


class NibbleLinear(ByteLinear):
    """W [O, N] as 4-bit msb codes (the top 4 of the 8), two per byte in llama.cpp's Q4_0 order
    (format.nested.to_nibbles), with float32 scale and minimum [O, ng] holding the 4-bit planes'
    values: 16 s and min + 7.5 s."""

    bits, matmul = 4, "nibble_matmul"

    def byte_codes(self, i: np.ndarray) -> np.ndarray:
        return nibbles_to_bytes(self.codes[i])


def packed_nbytes(shape: tuple[int, int], bits: int) -> int:
    """Bytes of W [O, N] once packed at `bits` (pack_linear's result)."""
    o, n = shape
    if bits in (4, 8):
        ng = -(-n // GROUP)
        return o * ng * GROUP * bits // 8 + 2 * o * ng * 4  # codes, float32 scale and minimum
    return build_layout({"w": (o, n)}, SCHEME, GROUP).bytes_for_bits(bits)


def _f32(rows) -> np.ndarray:
    """A block of rows as float32 numpy (a numpy array, or a tensor in tests and tools)."""
    return rows if isinstance(rows, np.ndarray) and rows.dtype == np.float32 else \
        np.asarray(rows.float() if hasattr(rows, "float") else rows, np.float32)


def pack_codes(w, bits: int, backend) -> ByteLinear:
    """Quantize W [O, N] (an array, a tensor, or anything with .shape whose row slices are either) to 8-bit byte
    codes (ByteLinear) or their top 4 bits as nibbles (NibbleLinear), block of rows by block."""
    o, n = w.shape
    ng = -(-n // GROUP)
    codes = np.zeros((o, ng * GROUP * bits // 8), np.uint8)
    scale, minimum = np.zeros((o, ng), np.float32), np.zeros((o, ng), np.float32)

    def pack_block(r: int) -> None:
        q, s, m = msb_codes(_f32(w[r:r + ROWS_PER_BLOCK]), GROUP)
        s, m = s.astype(np.float32), m.astype(np.float32)
        if bits == 4:  # the 4-bit planes' values (nested.group_coefficients), exactly
            q, s, m = to_nibbles(q.reshape(len(q), -1) >> 4), s * np.float32(16), m + s * np.float32(7.5)
        codes[r:r + len(q)] = q.reshape(len(q), -1)
        scale[r:r + len(q)], minimum[r:r + len(q)] = s, m

    _by_row_blocks(o, pack_block)
    return (NibbleLinear if bits == 4 else ByteLinear)(codes, scale, minimum, n, backend)


def _by_row_blocks(rows: int, pack_block) -> None:
    """pack_block(r) for each block of ROWS_PER_BLOCK rows, on PACK_THREADS threads (numpy releases
    the GIL in the heavy steps)."""
    with ThreadPoolExecutor(PACK_THREADS) as pool:
        list(pool.map(pack_block, range(0, rows, ROWS_PER_BLOCK)))


def pack_linear(w, bits: int, backend) -> PackedLinear:
    """Quantize W [O, N] block of rows by block: codes at 4 and 8 bits, else a buffer holding `bits`
    chunks of nested planes."""
    if bits in (4, 8):
        return pack_codes(w, bits, backend)
    o, n = w.shape
    layout = build_layout({"w": (o, n)}, SCHEME, GROUP)
    buf = np.zeros(layout.bytes_for_bits(bits), dtype=np.uint8)

    def pack_block(r: int) -> None:
        pack_rows(layout, buf, {"w": quantize(_f32(w[r:r + ROWS_PER_BLOCK]), SCHEME, GROUP)}, r)

    _by_row_blocks(o, pack_block)
    return PackedLinear(layout, buf, bits, backend)
