"""Continuous batching: every active request advances in one forward per step (a prefill chunk, or the
last token it sampled), so the experts are read and computed once for all the tokens that chose them.

There is no scheduler thread: a request's generator that needs a token and finds no step running runs
the next one itself, for every active request, then hands each its token (a lone request steps in its
own thread, as before batching). A generator that is closed leaves the batch at once.
"""

from __future__ import annotations

import threading
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
    prefill_s: float = 0.0  # time until the first token

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
        self.stepping = False
        self.steps = 0

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
            self.queue.append(req)
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
        """The request's next token (None when it has ended), stepping the batch when no one else is."""
        while True:
            with self.cond:
                while not req.ready and not req.done and self.stepping:
                    self.cond.wait()
                if req.ready:
                    return req.ready.popleft()
                if req.error is not None:
                    raise req.error
                if req.done:
                    return None
                self.stepping = True
                self._admit()
                batch = list(self.active)
            try:
                self._step(batch)
            finally:
                with self.cond:
                    self.stepping = False
                    self.cond.notify_all()

    def _admit(self) -> None:
        while self.queue and len(self.active) < self.max_batch:
            self.active.append(self.queue.popleft())

    def _step(self, batch: list[Request]) -> None:
        """One forward over every request of the batch; each samples its token from its own logits."""
        feeds = [r.feed(self.prefill_chunk) for r in batch]
        call = Call(batch[0].knobs, RunStats(), rows=tuple((len(f), r.knobs) for f, r in zip(feeds, batch,
                                                                                            strict=True)))
        try:
            logits = self.forward([(f, r.cache) for f, r in zip(feeds, batch, strict=True)], call)
        except BaseException as e:
            with self.cond:
                for r in batch:
                    r.error, r.done = e, True
            raise
        self.steps += 1
        with self.cond:
            for i, (r, f) in enumerate(zip(batch, feeds, strict=True)):
                r.stats.merge(call.stats)
                if not r.done:
                    r.take(logits[i], len(f))
                if r.done and r in self.active:
                    self.active.remove(r)
