"""The memory budget: account every byte at start-up, size the expert cache, and sample peak RSS."""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, replace

import psutil

from edge_moe.config import ModelConfig, format_size
from edge_moe.errors import BudgetError
from edge_moe.format.nested import MAX_BITS

MIN_MARGIN = 96 * 2**20  # allocator slack, numba/torch workspaces, tokenizer, manifest
GPU_MIN_MARGIN = 32 * 2**20  # caching-allocator rounding and cuBLAS workspaces
MARGIN_FRACTION = 0.04


def current_rss() -> int:
    return psutil.Process().memory_info().rss


@dataclass(frozen=True)
class MemoryPlan:
    """Where the budget goes, and every decision it implies: `cache_units` expert chunks of `unit_bytes`
    fit in what is left; whether the whole model is read in the background (`fill`); whether the backend
    may keep resident experts in its faster forms (`resident_forms`: only when every chunk stays)."""

    budget: int | None  # None: no cap (the cache holds every chunk)
    baseline: int  # RSS before loading the model: interpreter, torch, numba, edge_moe
    dense: int
    kv_cache: int
    activations: int
    margin: int
    unit_bytes: int
    cache_units: int
    min_units: int  # one MoE layer's active experts at the lowest width
    every_unit: int  # every chunk of every expert
    fill: bool = False
    resident_forms: bool = False

    @property
    def cache_bytes(self) -> int:
        return self.cache_units * self.unit_bytes

    @property
    def holds_everything(self) -> bool:
        return self.cache_units >= self.every_unit

    def decide(self, speculative: bool, keep: bool, forms: bool) -> MemoryPlan:
        """The plan with its policy decisions: a background fill where speculative reads are on and a
        budget holds every chunk; resident forms where experts are kept and every chunk fits."""
        return replace(self, fill=speculative and self.budget is not None and self.holds_everything,
                       resident_forms=forms and keep and self.holds_everything)

    def describe(self) -> str:
        parts = [("process baseline", self.baseline), ("dense weights", self.dense),
                 ("KV cache", self.kv_cache), ("activations", self.activations),
                 ("margin", self.margin), ("expert cache", self.cache_bytes)]
        body = ", ".join(f"{name} {format_size(n)}" for name, n in parts)
        budget = f"budget {format_size(self.budget)}" if self.budget is not None else "no budget"
        every = ", every level" if self.holds_everything else ""
        units = f"{self.cache_units} chunks of {format_size(self.unit_bytes)}{every}"
        return f"memory plan for {budget}: {body} ({units})"


def activation_bytes(cfg: ModelConfig, prefill_chunk: int, max_tokens: int, batch: int = 1) -> int:
    """Peak float32 temporaries of one forward over a prefill chunk beside batch - 1 decode tokens
    (hidden, attention, MoE, logits)."""
    c, d = prefill_chunk + batch - 1, cfg.hidden_size
    hidden = 16 * c * d
    attention = c * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * 3 + cfg.num_heads * c * max_tokens
    moe = c * cfg.top_k * (2 * cfg.moe_intermediate_size + 2 * d) + 2 * c * max(cfg.intermediate_size, 0)
    return 4 * (hidden + attention + moe + 2 * batch * cfg.vocab_size)


def plan_memory(budget: int | None, cfg: ModelConfig, dense_bytes: int, kv_bytes: int, unit_bytes: int,
                prefill_chunk: int, max_tokens: int, baseline: int | None = None,
                what: str = "--memory-budget", min_margin: int = MIN_MARGIN, batch: int = 1) -> MemoryPlan:
    """Split the budget (None: no cap, every chunk cached); raise BudgetError with the numbers when one
    layer's experts cannot fit. The cache never gets more units than the model has chunks. kv_bytes
    is the KV cache of every one of `batch` requests."""
    baseline = current_rss() if baseline is None else baseline
    acts = activation_bytes(cfg, prefill_chunk, max_tokens, batch)
    every = len(cfg.moe_layers) * cfg.num_experts * MAX_BITS
    min_units = 2 * cfg.top_k  # each active expert's 2-bit base is 2 chunks
    if budget is None:
        return MemoryPlan(None, baseline, dense_bytes, kv_bytes, acts, 0, unit_bytes, every, min_units, every)
    margin = max(min_margin, int(MARGIN_FRACTION * budget))
    fixed = baseline + dense_bytes + kv_bytes + acts + margin
    units = (budget - fixed) // unit_bytes
    if units < min_units:
        need = fixed + min_units * unit_bytes
        raise BudgetError(
            f"budget {format_size(budget)} is below the {format_size(need)} minimum for this model: "
            f"process {format_size(baseline)} + dense {format_size(dense_bytes)} + KV cache "
            f"{format_size(kv_bytes)} + activations {format_size(acts)} + margin {format_size(margin)} "
            f"+ one layer's {cfg.top_k} experts at 2 bits {format_size(min_units * unit_bytes)}; "
            f"raise {what} (or lower --max-context{' or --max-batch' if batch > 1 else ''})")
    return MemoryPlan(budget, baseline, dense_bytes, kv_bytes, acts, margin, unit_bytes, min(units, every),
                      min_units, every)


MADV_DONTNEED = 4
CODE_LIBRARIES = ("libllvmlite",)  # LLVM: ~180 MB of code, used to load the compiled kernels, then idle


def release_code_pages(libraries=CODE_LIBRARIES) -> None:
    """Unmap the resident pages of these libraries' code (read-execute, never written, so they fault
    back from the file on their next use); a no-op off Linux. Right after an install the page cache
    holds a fresh library in large folios and maps them whole: libllvmlite's code took 96 MB of RSS
    there against 35 MB in an older install, most of the gap between 218 and 170 MB of baseline."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "r-xp" and any(lib in parts[5] for lib in libraries):
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    libc.madvise(start, end - start, MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps large freed blocks after load-time work,
    which would otherwise stay in RSS for the whole run); a no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """Peak RSS of the process, and of the current request. The process's is the kernel's high-water
    mark (VmHWM, what `/usr/bin/time -v` and getrusage report), never reset. A request's: the process's
    mark when the request raised it, else the largest RSS sampled at its steps (`sample()`). Where the
    kernel keeps no mark, a thread samples RSS every `interval` seconds for both (on a 2-core machine
    it preempted the kernels' threads and cost ~10% of decode speed, hence the kernel's counter)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._hwm = _has_hwm()
        self._statm = Statm.open()
        self._process = current_rss()  # the sampler's process peak (no VmHWM)
        self._mark, self._sampled = self.process_peak, current_rss()
        self._stop = threading.Event()
        self._thread = None
        if not self._hwm:
            self._thread = threading.Thread(target=self._run, name="edge-moe-rss", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            rss = proc.memory_info().rss
            self._sampled, self._process = max(self._sampled, rss), max(self._process, rss)

    @property
    def process_peak(self) -> int:
        """Peak RSS since the process started."""
        return read_hwm() if self._hwm else self._process

    @property
    def peak(self) -> int:
        """Peak RSS since `start()`: exact when the request set the process's peak, else sampled."""
        process = self.process_peak
        return process if process > self._mark else self._sampled

    def start(self) -> None:
        """A request begins: its peak counts from now."""
        self._mark, self._sampled = self.process_peak, current_rss()

    def sample(self) -> None:
        """Fold the RSS of now into the request's peak (between forward steps: one pread of /proc)."""
        self._sampled = max(self._sampled, self._statm.rss() if self._statm else current_rss())

    def stop(self) -> int:
        if self._statm:
            self._statm.close()
            self._statm = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak


def read_hwm() -> int:
    """The kernel's high-water mark of this process's RSS (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Statm:
    """/proc/self/statm kept open: its resident pages read with one pread (no open/close per step)."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls) -> Statm | None:
        try:
            return cls(os.open("/proc/self/statm", os.O_RDONLY))
        except OSError:
            return None

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * _PAGE

    def close(self) -> None:
        os.close(self.fd)


def _has_hwm() -> bool:
    try:
        return read_hwm() > 0
    except OSError:
        return False


