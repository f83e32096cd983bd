"""A run's recording for `edge-moe profile`: timed spans on named threads (load phases, steps, expert
reads, computes, stalls), which experts ran at which widths, and the process's RSS sampled from /proc."""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager

from edge_moe.runtime.memory import Statm, read_hwm


class Trace:
    """Events as the runtime reports them; every method is cheap (one list append) and thread-safe."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.spans: list[tuple] = []  # (name, category, thread, start, end, args)
        self.samples: list[tuple] = []  # (time, rss, hwm, evictions, bytes read, cache bytes by chunk)
        self.uses: Counter = Counter()  # (layer, expert, bits) -> (token, expert) pairs

    def span(self, name: str, cat: str, start: float, end: float, **args) -> None:
        self.spans.append((name, cat, threading.current_thread().name, start, end, args))

    @contextmanager
    def phase(self, name: str):
        """A load phase on the calling thread."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.span(name, "load", start, time.perf_counter())

    def used(self, layer: int, experts, bits, counts) -> None:
        """Pairs computed per (layer, expert, width)."""
        for e, b, n in zip(experts.tolist(), bits.tolist(), counts.tolist(), strict=True):
            self.uses[(layer, e, b)] += n

    def chrome(self) -> dict:
        """The trace-event format (ui.perfetto.dev, chrome://tracing): threads as tracks, counters for
        RSS, evictions and bytes read; times in microseconds from the trace's start."""
        tids: dict[str, int] = {}
        events = []
        for name, cat, thread, start, end, args in sorted(self.spans, key=lambda s: s[3]):
            tid = tids.setdefault(thread, len(tids) + 1)
            events.append({"name": name, "cat": cat, "ph": "X", "pid": 1, "tid": tid,
                           "ts": round((start - self.t0) * 1e6, 1), "dur": round((end - start) * 1e6, 1),
                           "args": args})
        for t, rss, hwm, evictions, read, by_chunk in self.samples:
            ts = round((t - self.t0) * 1e6, 1)
            events.append({"name": "memory", "ph": "C", "pid": 1, "ts": ts,
                           "args": {"rss_mb": rss / 1e6, "high_water_mb": hwm / 1e6}})
            events.append({"name": "expert I/O", "ph": "C", "pid": 1, "ts": ts,
                           "args": {"bytes_read_mb": read / 1e6, "chunks_evicted": evictions}})
            if len(by_chunk):  # the cache's bytes by level: the 2-bit base, then each bit above it
                levels = {"2-bit base": by_chunk[0] + by_chunk[1]}
                levels.update({f"bit {c + 1}": by_chunk[c] for c in range(2, len(by_chunk))})
                events.append({"name": "expert cache MB", "ph": "C", "pid": 1, "ts": ts,
                               "args": {k: int(v) / 1e6 for k, v in levels.items()}})
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": thread}}
                   for thread, tid in tids.items()]
        return {"traceEvents": events, "displayTimeUnit": "ms"}


class Sampler:
    """A thread that appends (time, RSS, VmHWM, chunks evicted, bytes read, cache bytes by chunk) to
    trace.samples every `interval` seconds until stopped; `io()` gives the last three once the model
    exists."""

    def __init__(self, trace: Trace, interval: float = 0.005):
        self.trace, self.interval, self.io = trace, interval, lambda: (0, 0, ())
        self._stop = threading.Event()
        self._statm = Statm.open()
        self.thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.thread.start()

    def sample(self) -> None:
        self.trace.samples.append((time.perf_counter(), self._statm.rss(), read_hwm(), *self.io()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sample()
        self._statm.close()
