"""Continuous batching: requests that run together give the tokens each gives alone, share steps, and
leave the batch when closed."""

import threading

import pytest

import edge_moe
from edge_moe.api import DEMO_MODEL
from edge_moe.errors import BusyError

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo model not built into the package")
PROMPTS = ["def main():\n    ", "import os\n", "class Foo:\n    def", "# compute the sum of a list\n"]
KNOBS = [{"bits": 8}, {"bits": 4}, {"bits": 3}, {"quality": 0.5, "min_bits": 2, "max_bits": 6, "wait": True}]


def test_greedy_tokens_batched_equal_alone():
    with edge_moe.load(max_batch=4) as m:
        alone = [list(m.generate_ids(m.encode(p), max_tokens=24, **k))
                 for p, k in zip(PROMPTS, KNOBS, strict=True)]
        steps_alone = m.batcher.steps
        together = [None] * 4
        start = threading.Barrier(4)

        def run(i: int) -> None:
            start.wait()
            together[i] = list(m.generate_ids(m.encode(PROMPTS[i]), max_tokens=24, **KNOBS[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == alone
        assert m.batcher.steps - steps_alone < 0.5 * steps_alone  # they shared forward steps


def test_a_closed_stream_leaves_the_batch_and_a_full_queue_refuses():
    with edge_moe.load(max_batch=1, max_queue=1) as m:
        first = m.generate_ids(m.encode(PROMPTS[0]), max_tokens=50)
        next(first)
        assert len(m.batcher.active) == 1
        second = m.generate_ids(m.encode(PROMPTS[1]), max_tokens=5)
        waiting = threading.Thread(target=lambda: list(second))
        waiting.start()  # queued behind the first
        while not m.batcher.queue:
            pass
        with pytest.raises(BusyError, match="--max-batch 1"):
            next(m.generate_ids(m.encode(PROMPTS[2]), max_tokens=5))
        first.close()
        waiting.join(timeout=60)
        assert not waiting.is_alive() and not m.batcher.active and not m.batcher.queue


def test_the_plan_holds_a_kv_cache_per_batch_slot():
    with edge_moe.load(max_batch=1) as one, edge_moe.load(max_batch=3) as three:
        assert three.memory_plan.kv_cache == 3 * one.memory_plan.kv_cache
        assert three.memory_plan.activations > one.memory_plan.activations


def test_closing_the_model_ends_a_waiting_stream():
    m = edge_moe.load(max_batch=2)
    stream = m.generate_ids(m.encode(PROMPTS[0]), max_tokens=500)
    next(stream)
    m.close()
    with pytest.raises(BusyError, match="closed"):
        for _ in range(500):  # tokens already sampled may come first
            next(stream)
