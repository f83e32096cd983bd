"""Byte layout of one expert's range: 8 chunks in order, so b bits is a prefix of b chunks.

Chunk c holds bit-plane c of every matrix, then one fp16 metadata array per matrix:
chunk 0 the scales, chunk 1 the minimums, chunks 2..7 the residual scales (mwq; none for msb).
Level 1 (2 bits) is chunks 0-1; level k > 1 adds chunk k. Every chunk fits in one unit of
`unit_bytes`, so a cache can hold chunks in a preallocated arena of equal units, never fragmenting;
a contiguous expert buffer (as read from disk) has chunk c at `chunk_starts[c]`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edge_moe.format.nested import BASE_BITS, MAX_BITS, NestedMatrix, check_group, num_groups

SECTION_ALIGN = 64  # cache line: every section starts on one, so kernels read aligned words
META_KIND = {0: "scale", 1: "minimum"}  # chunk -> metadata; chunks >= 2 carry "alpha" (mwq)


def _align(n: int, a: int = SECTION_ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Section:
    chunk: int  # 0..7 (= plane index)
    matrix: str
    kind: str  # "planes" | "scale" | "minimum" | "alpha"
    offset: int  # bytes from the start of the expert range
    nbytes: int
    shape: tuple[int, ...]
    dtype: str  # "uint8" | "float16"

    @property
    def level(self) -> int:
        return max(1, self.chunk)


@dataclass(frozen=True)
class ExpertLayout:
    """Sections of one expert; shared by every expert of a model (they have equal shapes)."""

    scheme: str
    group: int
    matrices: tuple[tuple[str, tuple[int, int]], ...]  # ((name, (O, N)), ...)
    sections: tuple[Section, ...]
    chunk_starts: tuple[int, ...]  # 8 offsets of chunk c in a contiguous expert range
    chunk_sizes: tuple[int, ...]
    unit_bytes: int  # the largest chunk, 64-aligned

    @functools.cached_property
    def level_ends(self) -> tuple[int, ...]:
        """level_ends[k-1]: bytes of a prefix read of levels 1..k (bits k+1); computed once (the cuda
        path's per-call checks asked ~70 times a decode step)."""
        return tuple(self.chunk_starts[b - 1] + self.chunk_sizes[b - 1]
                     for b in range(BASE_BITS, MAX_BITS + 1))

    @property
    def nbytes(self) -> int:
        return self.level_ends[-1]

    def bytes_for_bits(self, bits: int) -> int:
        return self.level_ends[bits - BASE_BITS]

    def in_chunk(self, matrix: str, kind: str) -> int:
        """Offset of `matrix`'s plane (kind 'planes') or metadata (kind 'meta') inside any chunk."""
        for s in self.sections:
            if s.matrix == matrix and (s.kind == kind or (kind == "meta" and s.kind != "planes")):
                return s.offset - self.chunk_starts[s.chunk]
        raise KeyError((matrix, kind))

    def plane_offsets(self, matrix: str) -> np.ndarray:
        """Byte offset of each of the 8 planes of `matrix` in a contiguous expert range (int64 [8])."""
        return np.array([s.offset for s in self.sections if s.matrix == matrix and s.kind == "planes"],
                        dtype=np.int64)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group": self.group,
                "matrices": {name: list(shape) for name, shape in self.matrices},
                "chunk_sizes": list(self.chunk_sizes), "level_ends": list(self.level_ends)}


def _chunk_sections(chunk: int, matrices: dict, scheme: str, group: int):
    """(matrix, kind, shape, dtype) of one chunk: planes of every matrix, then their metadata."""
    for name, (o, n) in matrices.items():
        yield name, "planes", (o, num_groups(n, group) * group // 8), "uint8"
    kind = META_KIND.get(chunk, "alpha" if scheme == "mwq" else None)
    if kind:
        for name, (o, n) in matrices.items():
            yield name, kind, (o, num_groups(n, group)), "float16"


def build_layout(matrices: dict[str, tuple[int, int]], scheme: str, group: int) -> ExpertLayout:
    """Lay out chunks 0..7 of every matrix; sections 64-byte aligned, chunks in order."""
    check_group(group)
    sections, starts, sizes, pos = [], [], [], 0
    for chunk in range(MAX_BITS):
        starts.append(pos)
        for name, kind, shape, dtype in _chunk_sections(chunk, matrices, scheme, group):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            sections.append(Section(chunk, name, kind, pos, nbytes, shape, dtype))
            pos = _align(pos + nbytes)
        sizes.append(pos - starts[-1])
    return ExpertLayout(scheme, group, tuple((k, tuple(v)) for k, v in matrices.items()),
                        tuple(sections), tuple(starts), tuple(sizes), max(sizes))


def _section_values(m: NestedMatrix, s: Section) -> np.ndarray:
    if s.kind == "planes":
        return m.planes[s.chunk]
    if s.kind == "alpha":
        return m.alpha[s.chunk - BASE_BITS]
    return getattr(m, s.kind)


def pack_expert(layout: ExpertLayout, mats: dict[str, NestedMatrix]) -> bytes:
    """Serialize one expert's quantized matrices into its chunk-ordered byte range."""
    buf = np.zeros(layout.nbytes, dtype=np.uint8)
    pack_rows(layout, buf, mats, 0)
    return buf.tobytes()


def pack_rows(layout: ExpertLayout, buf: np.ndarray, mats: dict[str, NestedMatrix], row0: int) -> None:
    """Write quantized rows row0.. of each matrix into the sections that `buf` (a prefix of the
    range: its first chunks) holds; a large matrix is packed block by block this way."""
    for s in layout.sections:
        if s.offset + s.nbytes > buf.nbytes:
            continue
        values = _section_values(mats[s.matrix], s)
        assert values.shape[1:] == s.shape[1:] and row0 + len(values) <= s.shape[0], (s, values.shape, row0)
        _view(buf, s)[row0:row0 + len(values)] = values


def _view(buf: np.ndarray, s: Section) -> np.ndarray:
    return buf[s.offset:s.offset + s.nbytes].view(s.dtype).reshape(s.shape)


def unpack_matrix(layout: ExpertLayout, buf: np.ndarray, matrix: str, bits: int,
                  rows: np.ndarray | None = None) -> NestedMatrix:
    """NestedMatrix holding the first `bits` planes of `matrix` (or of its `rows` only), from a
    contiguous expert buffer."""
    need = layout.bytes_for_bits(bits)
    if buf.nbytes < need:
        raise ValueError(f"buffer holds {buf.nbytes} bytes, {bits} bits need {need}")
    parts: dict[str, list] = {"planes": [], "alpha": [], "scale": [], "minimum": []}
    for s in layout.sections:
        if s.matrix == matrix and s.chunk < bits:
            parts[s.kind].append(_view(buf, s) if rows is None else _view(buf, s)[rows])
    alpha = np.stack(parts["alpha"]) if parts["alpha"] else None
    o, n = dict(layout.matrices)[matrix]
    return NestedMatrix(layout.scheme, (o if rows is None else len(rows), n), layout.group,
                        np.stack(parts["planes"]), parts["scale"][0], parts["minimum"][0], alpha)


def to_units(layout: ExpertLayout, buf: np.ndarray, bits: int = MAX_BITS) -> np.ndarray:
    """Copy the first `bits` chunks of a contiguous expert buffer into units [bits, unit_bytes]."""
    units = np.zeros((bits, layout.unit_bytes), dtype=np.uint8)
    for c in range(bits):
        start = layout.chunk_starts[c]
        units[c, :layout.chunk_sizes[c]] = buf[start:start + layout.chunk_sizes[c]]
    return units


def from_units(layout: ExpertLayout, arena: np.ndarray, units, bits: int) -> np.ndarray:
    """Gather chunks held in arena units back into a contiguous expert buffer (the oracle's input)."""
    buf = np.zeros(layout.bytes_for_bits(bits), dtype=np.uint8)
    for c in range(bits):
        start = layout.chunk_starts[c]
        buf[start:start + layout.chunk_sizes[c]] = arena[units[c], :layout.chunk_sizes[c]]
    return buf
