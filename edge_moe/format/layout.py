"""Byte layout of one expert's range: all its matrices, level by level, so level <= k is a prefix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_moe.format.nested import (
    BASE_BITS,
    NUM_LEVELS,
    NestedMatrix,
    check_group,
    num_groups,
)

SECTION_ALIGN = 64  # cache line: every section starts on one, so kernels read aligned words


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Section:
    level: int  # 1-based
    matrix: str
    kind: str  # "planes" | "scale" | "minimum" | "alpha"
    offset: int  # bytes from the start of the expert range
    nbytes: int
    shape: tuple[int, ...]
    dtype: str  # "uint8" | "float16"


@dataclass(frozen=True)
class ExpertLayout:
    """Sections of one expert; shared by every expert of a model (they have equal shapes)."""

    scheme: str
    group: int
    matrices: tuple[tuple[str, tuple[int, int]], ...]  # ((name, (O, N)), ...)
    sections: tuple[Section, ...]
    level_ends: tuple[int, ...]  # level_ends[k-1]: bytes to read for levels 1..k

    @property
    def nbytes(self) -> int:
        return self.level_ends[-1]

    def bytes_for_bits(self, bits: int) -> int:
        return self.level_ends[bits - BASE_BITS]

    def plane_offsets(self, matrix: str) -> np.ndarray:
        """Byte offset of each of the 8 planes of `matrix` inside the expert range (int64 [8])."""
        out = []
        for s in self.sections:
            if s.matrix == matrix and s.kind == "planes":
                per_plane = s.nbytes // s.shape[0]
                out.extend(s.offset + i * per_plane for i in range(s.shape[0]))
        return np.asarray(out, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group": self.group,
                "matrices": {name: list(shape) for name, shape in self.matrices},
                "level_ends": list(self.level_ends)}


def _level_sections(level: int, name: str, o: int, n: int, scheme: str, group: int):
    row_bytes = num_groups(n, group) * group // 8
    meta = (o, num_groups(n, group))
    if level == 1:
        yield "planes", (BASE_BITS, o, row_bytes), "uint8"
        yield "scale", meta, "float16"
        yield "minimum", meta, "float16"
        return
    yield "planes", (1, o, row_bytes), "uint8"
    if scheme == "mwq":
        yield "alpha", meta, "float16"


def build_layout(matrices: dict[str, tuple[int, int]], scheme: str, group: int) -> ExpertLayout:
    """Lay out levels 1..7 of every matrix; sections 64-byte aligned, levels in order."""
    check_group(group)
    sections, ends, pos = [], [], 0
    for level in range(1, NUM_LEVELS + 1):
        for name, (o, n) in matrices.items():
            for kind, shape, dtype in _level_sections(level, name, o, n, scheme, group):
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                sections.append(Section(level, name, kind, pos, nbytes, shape, dtype))
                pos = _align(pos + nbytes, SECTION_ALIGN)
        ends.append(pos)
    return ExpertLayout(scheme, group, tuple((k, tuple(v)) for k, v in matrices.items()),
                        tuple(sections), tuple(ends))


def _section_values(m: NestedMatrix, s: Section) -> np.ndarray:
    if s.kind == "planes":
        first = 0 if s.level == 1 else BASE_BITS + s.level - 2
        return m.planes[first:first + s.shape[0]]
    if s.kind == "alpha":
        return m.alpha[s.level - 2]
    return getattr(m, s.kind)


def pack_expert(layout: ExpertLayout, mats: dict[str, NestedMatrix]) -> bytes:
    """Serialize one expert's quantized matrices into its level-ordered byte range."""
    buf = bytearray(layout.nbytes)
    for s in layout.sections:
        values = np.ascontiguousarray(_section_values(mats[s.matrix], s), dtype=s.dtype)
        assert values.shape == s.shape, (s, values.shape)
        buf[s.offset:s.offset + s.nbytes] = values.tobytes()
    return bytes(buf)


def _view(buf: np.ndarray, s: Section) -> np.ndarray:
    return buf[s.offset:s.offset + s.nbytes].view(s.dtype).reshape(s.shape)


def unpack_matrix(layout: ExpertLayout, buf: np.ndarray, matrix: str, bits: int) -> NestedMatrix:
    """NestedMatrix holding the first `bits` planes of `matrix`, from an expert buffer (uint8)."""
    levels = bits - BASE_BITS + 1
    if buf.nbytes < layout.level_ends[levels - 1]:
        raise ValueError(f"buffer holds {buf.nbytes} bytes, {bits} bits need "
                         f"{layout.level_ends[levels - 1]}")
    parts = {"planes": [], "alpha": []}
    meta = {}
    for s in layout.sections:
        if s.matrix != matrix or s.level > levels:
            continue
        if s.kind in parts:
            parts[s.kind].append(_view(buf, s))
        else:
            meta[s.kind] = _view(buf, s)
    shape = dict(layout.matrices)[matrix]
    alpha = np.stack(parts["alpha"]) if parts["alpha"] else None
    return NestedMatrix(layout.scheme, shape, layout.group, np.concatenate(parts["planes"]),
                        meta["scale"], meta["minimum"], alpha)
