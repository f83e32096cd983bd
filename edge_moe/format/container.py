"""The .emoe container: a fixed header, a JSON manifest, then aligned blobs with CRC32 checksums.

    [0:32)   magic "EDGEMOE\\0", u32 version, u32 crc32(manifest), u64 manifest length, u64 data offset
    [32:..)  manifest (UTF-8 JSON): model config, quantization, expert layout, blob table
    [data offset:)  blobs: tokenizer files, dense bf16 tensors, expert ranges (4 KiB aligned)

Blob offsets in the manifest are relative to the data offset, so the manifest can be written
before the data. Checksums are fixed-width hex strings, filled in place once the data is written.
An expert range stores one checksum per level, so any prefix read can be verified.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from edge_moe.errors import FormatError

try:  # ISA-L's CRC32: the same checksum as zlib's at ~25 GB/s instead of ~2 (expert reads verify it)
    from isal.isal_zlib import crc32
except ImportError:  # platforms without an isal wheel
    from zlib import crc32

MAGIC = b"EDGEMOE\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
DATA_ALIGN = 4096  # page: prefix reads of experts start page-aligned
DENSE_ALIGN = 64
DIRECT_ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers: covers every logical block size
_NO_CRC = "00000000"


def _open_direct(path: Path) -> int | None:
    """A descriptor for direct I/O (O_DIRECT: the disk writes into our buffer, no page-cache copy;
    here 1.5-1.9 ms of CPU per 3.3 MB read became 0.2 ms), or None where there is none (macOS, tmpfs)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else None
    except OSError:
        return None


def _direct_ok(pos: int, dests) -> bool:
    """Direct I/O needs the file offset, and every buffer's address and length, block-aligned."""
    return pos % DIRECT_ALIGN == 0 and all(d.ctypes.data % DIRECT_ALIGN == 0 and d.nbytes % DIRECT_ALIGN == 0
                                           for d in dests)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def crc_hex(data) -> str:
    return f"{crc32(data) & 0xFFFFFFFF:08x}"


def plan(base: dict, dense: dict[str, dict], files: dict[str, int], expert_layers: list[int],
         num_experts: int, level_ends: list[int]) -> dict:
    """Manifest with every blob's relative offset assigned: files, dense tensors, then experts."""
    pos, manifest = 0, dict(base)
    manifest["files"], manifest["dense"] = {}, {}
    for name, nbytes in files.items():
        manifest["files"][name] = {"offset": pos, "nbytes": nbytes, "crc32": _NO_CRC}
        pos = _align(pos + nbytes, DENSE_ALIGN)
    for name, spec in dense.items():
        manifest["dense"][name] = {**spec, "offset": pos, "crc32": _NO_CRC}
        pos = _align(pos + spec["nbytes"], DENSE_ALIGN)
    offsets, crcs = [], []
    for _ in expert_layers:
        row = []
        for _ in range(num_experts):
            pos = _align(pos, DATA_ALIGN)
            row.append(pos)
            pos += level_ends[-1]
        offsets.append(row)
        crcs.append([[_NO_CRC] * len(level_ends) for _ in range(num_experts)])
    manifest["experts"] = {"layers": list(expert_layers), "offsets": offsets, "crc32": crcs}
    manifest["data_end"] = pos
    return manifest


def _header_bytes(manifest: dict) -> tuple[bytes, int]:
    text = json.dumps(manifest, separators=(",", ":")).encode()
    data_offset = _align(HEADER.size + len(text), DATA_ALIGN)
    head = HEADER.pack(MAGIC, VERSION, crc32(text) & 0xFFFFFFFF, len(text), data_offset)
    return head + text, data_offset


class ContainerWriter:
    """Writes a planned container at `path` blob by blob (any order); finish() seals it."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        head, self._data_offset = _header_bytes(manifest)
        os.pwrite(self._fd, head, 0)
        self._written: set = set()

    def _put(self, key, rel_offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, self._data_offset + rel_offset)
        self._written.add(key)

    def write_file(self, name: str, data: bytes) -> None:
        entry = self.manifest["files"][name]
        assert len(data) == entry["nbytes"], name
        entry["crc32"] = crc_hex(data)
        self._put(("file", name), entry["offset"], data)

    def write_dense(self, name: str, data: bytes) -> None:
        entry = self.manifest["dense"][name]
        assert len(data) == entry["nbytes"], (name, len(data), entry["nbytes"])
        entry["crc32"] = crc_hex(data)
        self._put(("dense", name), entry["offset"], data)

    def write_expert(self, row: int, expert: int, data: bytes) -> None:
        ends = self.manifest["expert_layout"]["level_ends"]
        assert len(data) == ends[-1]
        starts = [0] + ends[:-1]
        view = memoryview(data)
        crcs = [crc_hex(view[a:b]) for a, b in zip(starts, ends, strict=True)]
        self.manifest["experts"]["crc32"][row][expert] = crcs
        self._put(("expert", row, expert), self.manifest["experts"]["offsets"][row][expert], data)

    def finish(self) -> None:
        """Check every blob was written, fill the checksums into the manifest, flush to disk."""
        expected = len(self.manifest["files"]) + len(self.manifest["dense"]) + sum(
            len(r) for r in self.manifest["experts"]["offsets"])
        if len(self._written) != expected:
            raise FormatError(f"{self.path}: {expected - len(self._written)} blobs were not written")
        head, data_offset = _header_bytes(self.manifest)
        assert data_offset == self._data_offset, "manifest changed size while filling checksums"
        os.pwrite(self._fd, head, 0)
        os.ftruncate(self._fd, data_offset + self.manifest["data_end"])
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_manifest(m, path: str) -> None:
    """Every field the reader uses, of the right type and inside the data (before anything is allocated
    from it): a FormatError naming the field otherwise."""
    def bad(field: str, value) -> FormatError:
        return FormatError(f"{path}: manifest field {field} = {str(value)[:80]!r} is invalid; the file is "
                           "corrupt or from another edge-moe version")

    def count(field: str, value, lo: int = 0) -> int:
        if type(value) is not int or value < lo:
            raise bad(field, value)
        return value

    def mapping(field: str, value) -> dict:
        if not isinstance(value, dict):
            raise bad(field, value)
        return value

    def crc(field: str, value) -> None:
        if not (isinstance(value, str) and len(value) == 8 and all(c in "0123456789abcdef" for c in value)):
            raise bad(field, value)

    def blob(field: str, entry) -> None:
        entry = mapping(field, entry)
        end = count(f"{field}.offset", entry.get("offset")) + count(f"{field}.nbytes", entry.get("nbytes"))
        if end > data_end:
            raise bad(f"{field}.nbytes", entry["nbytes"])
        crc(f"{field}.crc32", entry.get("crc32"))

    mapping("manifest", m)
    data_end = count("data_end", m.get("data_end"))
    for key in ("model", "quant", "expert_layout"):
        mapping(key, m.get(key))
    ends = m["expert_layout"].get("level_ends")
    if not isinstance(ends, list) or not ends or any(type(e) is not int for e in ends) or \
            any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise bad("expert_layout.level_ends", ends)
    for name, entry in mapping("files", m.get("files")).items():
        blob(f"files.{name}", entry)
    for name, entry in mapping("dense", m.get("dense")).items():
        blob(f"dense.{name}", entry)
        shape = entry.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or \
                any(type(d) is not int or d < 1 for d in shape) or entry.get("dtype") != "bfloat16" or \
                2 * int(np.prod(shape, dtype=object)) != entry["nbytes"]:
            raise bad(f"dense.{name}.shape", shape)
    experts = mapping("experts", m.get("experts"))
    layers, offsets, crcs = experts.get("layers"), experts.get("offsets"), experts.get("crc32")
    if not isinstance(layers, list) or any(type(li) is not int or li < 0 for li in layers) or \
            len(set(layers)) != len(layers):
        raise bad("experts.layers", layers)
    for field, rows in (("experts.offsets", offsets), ("experts.crc32", crcs)):
        if not isinstance(rows, list) or len(rows) != len(layers) or \
                any(not isinstance(r, list) or len(r) != len(rows[0]) for r in rows):
            raise bad(field, rows)
    for i, row in enumerate(offsets):
        for e, offset in enumerate(row):
            if count(f"experts.offsets[{i}][{e}]", offset) + ends[-1] > data_end:
                raise bad(f"experts.offsets[{i}][{e}]", offset)
            levels = crcs[i][e]
            if not isinstance(levels, list) or len(levels) != len(ends):
                raise bad(f"experts.crc32[{i}][{e}]", levels)
            for k, c in enumerate(levels):
                crc(f"experts.crc32[{i}][{e}][{k}]", c)


class Container:
    """A read-only .emoe file: the manifest in memory, blobs read on demand and verified."""

    def __init__(self, path: str | Path, drop_page_cache: bool = False):
        self.path = Path(path)
        # drop_page_cache: expert reads bypass the OS page cache, as on a device whose RAM cannot also
        # cache the model file: direct I/O where the buffers allow it, else reads followed by advice
        # to forget the pages; and what was cached before is dropped at open.
        self.drop_page_cache = drop_page_cache
        if self.path.is_dir():
            hint = (f": it looks like a Hugging Face checkpoint, convert it first with `edge-moe convert "
                    f"{self.path} model.emoe`" if (self.path / "config.json").is_file() else "")
            raise FormatError(f"{self.path} is a directory, not an .emoe model file{hint}")
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"cannot open model file {self.path}: {e.strerror}") from None
        self._direct_fd = _open_direct(self.path) if drop_page_cache else None
        if drop_page_cache:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.manifest, self.data_offset = self._read_manifest()
        self._check_size()
        self._rows = {li: i for i, li in enumerate(self.manifest["experts"]["layers"])}
        self._level_ends = self.manifest["expert_layout"]["level_ends"]

    def _read_manifest(self) -> tuple[dict, int]:
        head = os.pread(self._fd, HEADER.size, 0)
        if len(head) < HEADER.size or head[:8] != MAGIC:
            raise FormatError(f"{self.path} is not an edge-moe model file (bad magic); "
                              "convert a checkpoint with `edge-moe convert`")
        _, version, crc, length, data_offset = HEADER.unpack(head)
        if version != VERSION:
            raise FormatError(f"{self.path} has format version {version}; this edge-moe reads "
                              f"version {VERSION}: convert the checkpoint again")
        size = os.fstat(self._fd).st_size
        if length > size or data_offset > size or data_offset < HEADER.size + length:
            raise FormatError(f"{self.path}: the header's manifest length {length} and data offset "
                              f"{data_offset} do not fit a file of {size} bytes; the file is corrupt")
        text = os.pread(self._fd, length, HEADER.size)
        if len(text) < length or crc32(text) & 0xFFFFFFFF != crc:
            raise FormatError(f"{self.path}: manifest is corrupt (checksum mismatch)")
        try:
            manifest = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FormatError(f"{self.path}: the manifest is not valid JSON; the file is corrupt") from None
        check_manifest(manifest, str(self.path))
        return manifest, data_offset

    def _check_size(self) -> None:
        size = os.fstat(self._fd).st_size
        expected = self.data_offset + self.manifest["data_end"]  # check_manifest: every blob ends by data_end
        if size < expected:
            raise FormatError(f"{self.path} is truncated: {size} bytes, expected {expected}; "
                              "copy or convert it again")

    def _read(self, rel_offset: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8) if out is None else out[:nbytes]
        got = os.preadv(self._fd, [memoryview(buf)], self.data_offset + rel_offset)
        if got != nbytes:
            raise FormatError(f"{self.path}: short read at {rel_offset} ({got} of {nbytes} bytes)")
        return buf

    def _verify(self, data, crc: str, what: str) -> None:
        if crc_hex(data) != crc:
            raise FormatError(f"{self.path}: checksum mismatch in {what}; the file is corrupt, "
                              "convert the checkpoint again")

    def read_file(self, name: str) -> bytes | None:
        entry = self.manifest["files"].get(name)
        if entry is None:
            return None
        data = self._read(entry["offset"], entry["nbytes"])
        self._verify(data, entry["crc32"], f"file {name}")
        return data.tobytes()

    def read_dense(self, name: str) -> np.ndarray:
        """Raw bytes (uint8) of a dense tensor, checksum-verified."""
        entry = self._dense_entry(name)
        data = self._read(entry["offset"], entry["nbytes"])
        self._verify(data, entry["crc32"], f"tensor {name}")
        return data

    def verify_dense(self, name: str) -> None:
        """Check a dense tensor's checksum reading it a chunk at a time (memory stays at one chunk)."""
        entry = self._dense_entry(name)
        self._verify_range(entry["offset"], entry["nbytes"], entry["crc32"], f"tensor {name}")

    def _verify_range(self, offset: int, nbytes: int, crc: str, what: str, chunk: int = 16 * 2**20) -> None:
        got, buf = 0, np.empty(min(chunk, nbytes), np.uint8)
        for pos in range(0, nbytes, chunk):
            got = crc32(self._read(offset + pos, min(chunk, nbytes - pos), buf), got)
        if f"{got & 0xFFFFFFFF:08x}" != crc:
            raise FormatError(f"{self.path}: checksum mismatch in {what}; the file is corrupt, "
                              "convert the checkpoint again")

    def read_dense_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """Bytes [start, stop) of a dense tensor, unverified (verify_dense checks the whole)."""
        entry = self._dense_entry(name)
        if not 0 <= start <= stop <= entry["nbytes"]:
            raise FormatError(f"{self.path}: bytes {start}..{stop} lie outside tensor {name}")
        return self._read(entry["offset"] + start, stop - start)

    def _dense_entry(self, name: str) -> dict:
        entry = self.manifest["dense"].get(name)
        if entry is None:
            raise FormatError(f"{self.path}: dense tensor {name!r} is missing")
        return entry

    def expert_nbytes(self, levels: int) -> int:
        return self._level_ends[levels - 1]

    def _level_start(self, level: int) -> int:
        return self._level_ends[level - 2] if level > 1 else 0

    def read_levels(self, layer: int, expert: int, first_level: int, last_level: int,
                    dests: list, verify: bool = True) -> int:
        """Scatter levels first..last of one expert into `dests` (one buffer per chunk, in order).

        One preadv call: the level range is contiguous on disk; each buffer takes one chunk.
        Returns the bytes read.
        """
        row = self._rows[layer]
        start, end = self._level_start(first_level), self._level_ends[last_level - 1]
        views = [memoryview(d) for d in dests]
        pos = self.data_offset + self.manifest["experts"]["offsets"][row][expert] + start
        direct = self._direct_fd is not None and _direct_ok(pos, dests)
        got = os.preadv(self._direct_fd if direct else self._fd, views, pos)
        if got != end - start or sum(v.nbytes for v in views) != end - start:
            raise FormatError(f"{self.path}: short read of expert {expert} of layer {layer} "
                              f"({got} of {end - start} bytes)")
        if verify:
            self._verify_scattered(views, row, expert, layer, first_level, last_level)
        if self.drop_page_cache and not direct:
            os.posix_fadvise(self._fd, pos, end - start, os.POSIX_FADV_DONTNEED)
        return got

    def _verify_scattered(self, views, row, expert, layer, first, last) -> None:
        crcs, i = self.manifest["experts"]["crc32"][row][expert], 0
        for level in range(first, last + 1):
            crc, need = 0, self._level_ends[level - 1] - self._level_start(level)
            while need > 0:  # level 1 spans two chunks; every other level is one
                crc, need, i = crc32(views[i], crc), need - views[i].nbytes, i + 1
            if f"{crc & 0xFFFFFFFF:08x}" != crcs[level - 1]:
                raise FormatError(f"{self.path}: checksum mismatch in expert {expert} of layer {layer}, "
                                  f"level {level}; the file is corrupt, convert the checkpoint again")

    def read_expert(self, layer: int, expert: int, levels: int, out: np.ndarray | None = None,
                    first_level: int = 1, verify: bool = True) -> np.ndarray:
        """Read levels first_level..levels of one expert into a contiguous buffer `out`."""
        start, end = self._level_start(first_level), self._level_ends[levels - 1]
        out = np.empty(end, dtype=np.uint8) if out is None else out
        self.read_levels(layer, expert, first_level, levels, [out[start:end]], verify=False)
        if verify:
            self._verify_levels(out, self._rows[layer], expert, first_level, levels, layer)
        return out[:end]

    def _verify_levels(self, buf, row, expert, first, last, layer) -> None:
        crcs = self.manifest["experts"]["crc32"][row][expert]
        for k in range(first, last + 1):
            self._verify(buf[self._level_start(k):self._level_ends[k - 1]], crcs[k - 1],
                         f"expert {expert} of layer {layer}, level {k}")

    def data_bytes(self) -> int:
        """Bytes of blob data (what verify_all reads, plus alignment)."""
        return int(self.manifest["data_end"])

    def verify_all(self, progress=None) -> int:
        """Read every blob and check its checksum (FormatError at the first mismatch); returns the bytes
        checked. progress(nbytes) is called after each blob."""
        checked, m = 0, self.manifest
        blobs = [(e["offset"], e["nbytes"], e["crc32"], f"file {n}") for n, e in m["files"].items()]
        blobs += [(e["offset"], e["nbytes"], e["crc32"], f"tensor {n}") for n, e in m["dense"].items()]
        for layer, row in self._rows.items():
            for expert, offset in enumerate(m["experts"]["offsets"][row]):
                for level, crc in enumerate(m["experts"]["crc32"][row][expert], start=1):
                    start = self._level_start(level)
                    blobs.append((offset + start, self._level_ends[level - 1] - start, crc,
                                  f"expert {expert} of layer {layer}, level {level}"))
        for offset, nbytes, crc, what in blobs:
            self._verify_range(offset, nbytes, crc, what)
            checked += nbytes
            if progress is not None:
                progress(nbytes)
        return checked

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
