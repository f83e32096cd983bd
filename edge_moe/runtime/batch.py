"""Continuous batching: every active request advances in one forward per step (a prefill chunk, or the
last token it sampled), so the experts are read and computed once for all the tokens that chose them.

With max_batch > 1 one thread runs every step, whichever threads the requests come from: numba's
OpenMP runtime keeps a team of worker threads per calling thread, and teams of several callers spin
against each other for the cores (an HTTP server's thread pool, calling in turn, decoded at 0.75x).
With max_batch 1 the request's own thread steps: no hand-over per token (10-15% of a lone in-process
decode here). A request's generator waits for its tokens; closing it leaves the batch at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_moe.errors import BusyError
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.moe import Call
from edge_moe.runtime.stats import RunStats


@dataclass(eq=False)
class Request:
    """One generation in the batch: the prompt not yet run, the KV cache, and the tokens produced."""

    prompt: list[int]
    cache: object
    knobs: BitRequest
    pick: Callable[[np.ndarray], int]  # logits [V] -> token id
    max_tokens: int
    stop: set[int]
    stats: RunStats = field(default_factory=RunStats)
    fed: int = 0  # prompt tokens already run
    last: int | None = None  # the token sampled last, run next
    produced: int = 0
    ready: deque = field(default_factory=deque)  # tokens sampled, not yet taken
    done: bool = False
    error: BaseException | None = None

    def feed(self, chunk: int) -> list[int]:
        """The tokens this request runs in the next step."""
        if self.fed < len(self.prompt):
            return self.prompt[self.fed:self.fed + chunk]
        return [self.last]

    def take(self, logits: np.ndarray, n_fed: int) -> None:
        """After a step that ran n_fed of its tokens: sample once the prompt is through."""
        self.fed += n_fed if self.fed < len(self.prompt) else 0
        if self.fed < len(self.prompt):
            return
        token = self.pick(logits)
        self.last, self.produced = token, self.produced + 1
        self.ready.append(token)
        self.done = token in self.stop or self.produced >= self.max_tokens


class Batcher:
    """Runs the requests of one model together, at most max_batch per step; up to max_queue more wait
    for a slot (BusyError beyond that). `forward(seqs, call) -> logits [len(seqs), V]` runs one step."""

    def __init__(self, forward: Callable, max_batch: int, max_queue: int, prefill_chunk: int):
        self.forward, self.max_batch, self.max_queue = forward, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.cond = threading.Condition()
        self.active: list[Request] = []
        self.queue: deque[Request] = deque()
        self.steps = 0
        self.closed = False
        self.stepping = False  # a caller is stepping (max_batch 1)
        self.thread: threading.Thread | None = None
        self.trace = None  # a runtime.trace.Trace records each step (edge-moe profile)

    @property
    def depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self.queue)

    def run(self, req: Request) -> Iterator[int]:
        """Yield the request's tokens as they are sampled; it leaves the batch when this ends or closes."""
        with self.cond:
            if len(self.active) + len(self.queue) >= self.max_batch + self.max_queue:
                raise BusyError(f"{len(self.active)} requests are running and {len(self.queue)} waiting "
                                f"(--max-batch {self.max_batch}); try again later")
            if self.closed:
                raise BusyError("the model is closed")
            self.queue.append(req)
            if self.thread is None and self.max_batch > 1:
                self.thread = threading.Thread(target=self._loop, name="edge-moe-steps", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        try:
            while True:
                token = self._next(req)
                if token is None:
                    return
                yield token
        finally:
            with self.cond:
                req.done = True
                if req in self.active:
                    self.active.remove(req)
                if req in self.queue:
                    self.queue.remove(req)
                self.cond.notify_all()

    def _next(self, req: Request) -> int | None:
        """The request's next token, or None when it has ended; without a stepping thread, the caller
        runs the step when no one else is."""
        while True:
            with self.cond:
                while not req.ready and not req.done and not self.closed and (
                        self.thread is not None or self.stepping):
                    self.cond.wait()
                if req.ready:
                    return req.ready.popleft()
                if req.error is not None:
                    raise req.error
                if req.done:
                    return None
                if self.closed:
                    raise BusyError("the model was closed while this request ran")
                self.stepping = True
                self._admit()
                batch = list(self.active)
            try:
                self._step(batch)
            finally:
                with self.cond:
                    self.stepping = False
                    self.cond.notify_all()

    def _loop(self) -> None:
        """The stepping thread: a step whenever a request is active or waiting."""
        while True:
            with self.cond:
                while not self.closed and not self.active and not self.queue:
                    self.cond.wait()
                if self.closed:
                    return
                self._admit()
                batch = list(self.active)
            self._step(batch)
            with self.cond:
                self.cond.notify_all()

    def close(self) -> None:
        """Stop the stepping thread (after the step in flight)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def _admit(self) -> None:
        while self.queue and len(self.active) < self.max_batch:
            self.active.append(self.queue.popleft())

    def _step(self, batch: list[Request]) -> None:
        """One forward over every request of the batch; each samples its token from its own logits. An
        error ends every request of the step, raised in each one's generator."""
        feeds = [r.feed(self.prefill_chunk) for r in batch]
        rows = tuple((len(f), r.knobs) for f, r in zip(feeds, batch, strict=True))
        call = Call(batch[0].knobs, RunStats(), rows=rows)
        t0 = time.perf_counter()
        try:
            logits = self.forward([(f, r.cache) for f, r in zip(feeds, batch, strict=True)], call)
            error = None
        except BaseException as e:  # noqa: B036 (handed on, whatever it is)
            error = e
        if self.trace is not None:
            prefill = sum(len(f) for f, r in zip(feeds, batch, strict=True) if r.fed < len(r.prompt))
            self.trace.span("prefill" if prefill else "decode", "step", t0, time.perf_counter(),
                            requests=len(batch), tokens=sum(len(f) for f in feeds), prompt_tokens=prefill)
        with self.cond:
            self.steps += 1
            for i, (r, f) in enumerate(zip(batch, feeds, strict=True)):
                r.stats.merge(call.stats)
                if error is not None:
                    r.error, r.done = error, True
                elif not r.done:
                    r.take(logits[i], len(f))
                if r.done and r in self.active:
                    self.active.remove(r)
