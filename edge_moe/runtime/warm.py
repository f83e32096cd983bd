"""The kernels' first compile, done once per machine in child processes: LLVM's memory (170-270 MB,
which numba keeps) must not land in a process that has promised a memory budget. Only the groups of
entry points a model uses are compiled, two children at a time where there are two cores."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from edge_moe.kernels import warm as kernels_warm
from edge_moe.runtime import bookkeeping

BOOKKEEPING = (bookkeeping.assign_bits, bookkeeping.acquire_row, bookkeeping.fold_routing, bookkeeping.unpin,
               bookkeeping.count)
GROUPS = {**kernels_warm.GROUPS, "bookkeeping": BOOKKEEPING}
ENTRY_POINTS = tuple(f for group in GROUPS.values() for f in group)
# seconds each group took to compile on a 2-core AVX-512 machine: the longest go first, to balance children
COST = {"experts": 25, "nested": 20, "attention": 9, "forms": 6, "bookkeeping": 5, "dense8": 3, "dense4": 3}
MAX_CHILDREN = 2  # the experts group alone is about half of everything: a third child shortens nothing
CHILD = ("import sys; sys.path.insert(0, {root!r}); "
         "from edge_moe.runtime.warm import call_groups; call_groups({groups!r})")
POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def groups_for(backend: str, dense_bits: int, resident_forms: bool) -> tuple[str, ...]:
    """The groups a model calls: the decoder's and the cache's always, the cpu backend's kernels on it."""
    if backend == "cpu":
        return ("bookkeeping", *kernels_warm.groups_for(dense_bits, resident_forms))
    return ("bookkeeping", "attention")


def call_groups(names) -> None:
    """Call each entry point of these groups once: compiles them, or loads them from numba's cache."""
    for name in names:
        _call_bookkeeping() if name == "bookkeeping" else kernels_warm.call_group(name)


def call_every_kernel() -> None:
    call_groups(GROUPS)


def _call_bookkeeping() -> None:
    """The decode step's bookkeeping (BitRequest.assign, ExpertCache.acquire and release, RunStats) on a
    row of 4 experts, with the runtime's dtypes."""
    experts, bits, counter = np.array([2, 0]), np.array([4, 3]), np.zeros(9, np.int64)
    bookkeeping.assign_bits(np.array([[0.7, 0.3]]), 0.5, 3, 4)
    held, pins, last_used = np.full(4, 8), np.zeros(4, np.int64), np.zeros(4, np.int64)
    forms, units = np.zeros(4, np.int8), np.zeros((4, 8), np.int64)
    table = np.zeros((1, 9, 9), np.int8)
    bookkeeping.acquire_row(held, pins, np.zeros(4), last_used, 1, 0.5, forms, units, table, experts,
                            np.ones(2, np.int64), bits, np.empty((2, 8), np.int64), np.empty(2, np.int8),
                            np.empty(2, np.int64))
    bookkeeping.fold_routing(np.zeros(4), last_used, np.ones(4, np.int64), 2, 0.5)  # record_routing
    bookkeeping.unpin(pins, experts)
    bookkeeping.count(bits, counter, counter.copy())


def _on_disk(dispatcher) -> bool:
    """numba's cache holds this function, for this machine and this source (numba internals; any
    change there reads as 'not cached', which only costs a child process)."""
    try:
        cache, codegen = dispatcher._cache, dispatcher.targetctx.codegen()
        index = cache._cache_file._load_index()
        return any(cache._index_key(key[0], codegen) == key for key in index)
    except Exception:  # noqa: BLE001 - a missing or unreadable cache is simply not a cache
        return False


def compiled(names=GROUPS) -> bool:
    return all(_on_disk(f) for name in names for f in GROUPS[name])


def _share_out(names: list[str], children: int) -> list[list[str]]:
    """Groups dealt to children, longest first, each to the child with the least work so far."""
    shares, work = [[] for _ in range(children)], [0] * children
    for name in sorted(names, key=lambda n: -COST.get(n, 1)):
        i = work.index(min(work))
        shares[i].append(name)
        work[i] += COST.get(name, 1)
    return [s for s in shares if s]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Progress:
    """A line on stderr: rewritten in place on a terminal, else printed again each time a part is done."""

    def __init__(self, total: int):
        self.total, self.t0, self.tty, self.shown = total, time.monotonic(), sys.stderr.isatty(), -1
        self.show(0)

    def show(self, done: int, end: bool = False) -> None:
        if not self.tty and done == self.shown:
            return
        self.shown = done
        line = (f"edge-moe: compiling the cpu kernels for this machine, once: {done} of {self.total} parts, "
                f"{time.monotonic() - self.t0:.0f} s")
        print("\r" + line if self.tty else line, end="\n" if end or not self.tty else "", file=sys.stderr,
              flush=True)


def _die_with_parent() -> None:
    """In a child before exec: Linux kills it when this process dies, however it dies (SIGKILL
    included); elsewhere the parent's cleanup on exit has to do."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class _Compile:
    """Child processes compiling groups into numba's cache; `wait()` shows progress and says why it failed."""

    def __init__(self, names: list[str]):
        # the children must compile these very files, whatever their working directory holds (a source
        # tree there shadowed an installed package and a child filled the wrong cache)
        root = str(Path(__file__).resolve().parents[2])
        self.names = names
        shares = _share_out(names, min(MAX_CHILDREN, _cores()))
        self.logs = [tempfile.TemporaryFile("w+") for _ in shares]  # a pipe could fill and stall a child
        self.children = [subprocess.Popen([sys.executable, "-c", CHILD.format(root=root, groups=share)],
                                          stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
                         for share, log in zip(shares, self.logs, strict=True)]
        self.progress = _Progress(len(names))

    def wait(self) -> str | None:
        try:
            while any(c.poll() is None for c in self.children):
                time.sleep(POLL_S)
                self.progress.show(sum(compiled([n]) for n in self.names))
        finally:
            for child in self.children:
                if child.poll() is None:  # interrupted: nothing is left running behind the user's back
                    child.kill()
                child.wait()
            errors = []
            for log in self.logs:
                log.seek(0)
                errors.append(log.read())
                log.close()
        self.progress.show(sum(compiled([n]) for n in self.names), end=True)
        failed = [(c.returncode, e) for c, e in zip(self.children, errors, strict=True) if c.returncode != 0]
        if failed:
            return f"exit {failed[0][0]}: {failed[0][1].strip()[-300:]}"
        return None if compiled(self.names) else "is numba's cache directory writable?"


_loaded: set[str] = set()  # groups this process has called once
_running: _Compile | None = None  # children started by start(), waited for by prepare()


def start(names) -> None:
    """Start compiling whichever of these groups numba's cache lacks, in child processes, and return at
    once (a caller can import the rest meanwhile); prepare() waits for them."""
    global _running
    missing = [n for n in dict.fromkeys(names) if n not in _loaded and not compiled([n])]
    if missing and _running is None:
        _running = _Compile(missing)


def prepare(names=tuple(GROUPS)) -> None:
    """Make these groups of kernels ready before a budgeted process measures its baseline: compile them
    in child processes if numba's cache lacks them, then load them here (~0.2 s, their code and threads
    then count in the baseline)."""
    global _running
    todo = [n for n in dict.fromkeys(names) if n not in _loaded]
    if not todo:
        return
    while True:
        start(todo)
        if _running is None:
            break
        why, _running = _running.wait(), None
        if why:
            warnings.warn(f"the cpu kernels could not be compiled into numba's cache ({why}); they compile in "
                          "this process, whose RSS may pass --memory-budget by ~200 MB", RuntimeWarning,
                          stacklevel=2)
            break
    call_groups(todo)
    _loaded.update(todo)
