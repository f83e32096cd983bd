"""`edge-moe device-profile`: measure this machine (memory read rate, the disk at the cache's read size,
the expert kernels' time per width for a model's shapes) and write a device profile a person can edit."""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import psutil
import yaml

from edge_moe.api import DEMO_MODEL
from edge_moe.config import CPU_DENSE_BITS
from edge_moe.format.container import Container
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.kernels import get_backend
from edge_moe.model.load import read_model
from edge_moe.runtime.arena import HostArena
from edge_moe.runtime.warm import groups_for, prepare

DRAM_BYTES = 256 * 2**20
PART_S = 2.0  # each disk measurement reads for about this long


def dram_read_gb_s(threads: int, repeats: int = 5) -> float:
    """Reading a 256 MB array on `threads` threads at once (numpy sums, which release the GIL); the best
    of `repeats` passes."""
    a = np.ones(DRAM_BYTES // 4, np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.add.reduce, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def disk_read_mb_s(path: Path, direct: bool, seconds: float = PART_S) -> float:
    """Whole experts read as the cache reads them (every level in one scattered read into page-aligned
    units), distinct experts in a random order for about `seconds`; buffered reads start from a file
    the page cache has been told to drop."""
    with Container(path, drop_page_cache=direct) as c:
        _, layout = read_model(c)
        if not direct:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        layers = c.manifest["experts"]["layers"]
        pairs = [(layer, e) for layer in layers for e in range(len(c.manifest["experts"]["offsets"][0]))]
        order = np.random.default_rng(0).permutation(len(pairs))
        arena = HostArena(MAX_BITS, layout.unit_bytes)
        n, t0 = 0, time.perf_counter()
        for i in order:
            n += arena.load(c, *pairs[i], 0, MAX_BITS, list(range(MAX_BITS)), layout.chunk_sizes, False)
            if time.perf_counter() - t0 > seconds:
                break
        return n / (time.perf_counter() - t0) / 1e6


def expert_ms(path: Path, repeats: int = 30) -> dict[int, float]:
    """One token through one expert of the model's shapes at each width (random planes), median ms."""
    prepare(groups_for("cpu", CPU_DENSE_BITS, True))
    ops = get_backend("cpu")
    with Container(path) as c:
        cfg, layout = read_model(c)
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, layout.bytes_for_bits(MAX_BITS), dtype=np.uint8)
    x = rng.standard_normal((1, cfg.hidden_size)).astype(np.float32)
    out = {}
    for bits in range(BASE_BITS, MAX_BITS + 1):
        ops.expert_ffn(layout, buf, x, bits)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ops.expert_ffn(layout, buf, x, bits)
            times.append(time.perf_counter() - t0)
        out[bits] = round(1e3 * float(np.median(times)), 4)
    return out


def measure(model: str | Path | None, progress=print) -> dict:
    """Every measurement, as a profile's fields."""
    path = Path(model) if model is not None else DEMO_MODEL
    cores = os.cpu_count() or 1
    memory = psutil.virtual_memory()
    progress(f"measuring memory reads on {cores} threads")
    dram = dram_read_gb_s(cores)
    progress(f"reading experts of {path.name} buffered, then direct")
    buffered, direct = disk_read_mb_s(path, False), disk_read_mb_s(path, True)
    progress("timing the expert kernels at each width")
    kernels = expert_ms(path)
    budget = int(memory.available * 0.5) // 10**8 * 10**8  # half of what is free now, in 100 MB steps
    host = platform.node() or "this-machine"
    return {"name": host, "description": f"measured on {host}: {cores} cores, "
                                         f"{memory.total / 1e9:.1f} GB of RAM, {memory.available / 1e9:.1f} GB "
                                         f"free ({date.today()})",
            "device": "cpu", "memory_budget": f"{budget // 10**6}MB", "threads": cores,
            "dense_bits": CPU_DENSE_BITS, "streaming": "hebf" if cores >= 4 else "hebf-no-prefetch",
            "costs": {"dram_read_gb_s": round(dram, 2), "disk_read_mb_s": round(buffered, 1),
                      "disk_direct_read_mb_s": round(direct, 1), "expert_ms": kernels,
                      "expert_model": path.name}}


def write_profile(fields: dict, out: str | Path) -> None:
    text = yaml.safe_dump(fields, sort_keys=False)
    header = ("# Written by `edge-moe device-profile`: the costs are this machine's, measured; the budget is\n"
              "# half of the memory that was free, a starting point to edit (fields: profiles/README.md).\n")
    Path(out).write_text(header + text)
