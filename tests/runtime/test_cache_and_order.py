"""Eviction order of the expert cache and the hottest-expert-bit-first read order."""

import numpy as np

from edge_moe.format.layout import build_layout
from edge_moe.kernels import cpu
from edge_moe.runtime.arena import HostArena
from edge_moe.runtime.expert_cache import ExpertCache
from edge_moe.runtime.reader import Reader, Want, hebf_reads


def small_cache(n_units=10):
    layout = build_layout({"gate_up": (64, 64), "down": (64, 32)}, "msb", 64)
    return ExpertCache(layout, HostArena(n_units, layout.unit_bytes), layers=[0, 1], num_experts=4)


def fill(cache, row, expert, chunks, hot):
    cache.commit(row, expert, 0, cache.take_units(chunks, keep=(row, expert)))
    cache.hot[row, expert] = hot


def test_eviction_drops_top_planes_of_cold_experts_first_and_bases_last():
    cache = small_cache()
    fill(cache, 0, 0, 6, hot=1.0)  # cold expert at 6 bits
    fill(cache, 1, 2, 4, hot=10.0)  # hot expert at 4 bits
    states = []
    for _ in range(6):
        cache.take_units(1, keep=(0, 3))
        states.append((int(cache.held[0, 0]), int(cache.held[1, 2])))
    # a top chunk is worth hot * 2^-(chunk): the cold expert's (1 * 2^-5 .. 1 * 2^-2) go before
    # the hot expert's 10 * 2^-3 = 1.25, so the cold one falls to its base first
    assert states[:4] == [(5, 4), (4, 4), (3, 4), (2, 4)]
    assert states[4:] == [(2, 3), (2, 2)]
    cache.take_units(len(cache.free) + 1, keep=(0, 3))
    assert cache.held[0, 0] == 0 and cache.held[1, 2] == 2  # the colder base went first
    assert list(cache.evictions[:2]) == [1, 1]


def test_pinned_experts_are_never_evicted():
    cache = small_cache(4)
    fill(cache, 0, 1, 4, hot=0.0)
    cache.pins[0, 1] = 1
    assert cache.take_units(1, keep=(0, 2)) is None
    assert cache.held[0, 1] == 4


def test_hotness_is_an_exponential_moving_average():
    cache = small_cache()
    cache.record_routing(1, np.array([2, 0, 0, 1]))
    cache.record_routing(1, np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(cache.hot[1], [2 * cache.decay, 0, 0, cache.decay + 1])


def test_hebf_bases_hottest_first_then_levels():
    wants = [Want(5, 2, 4, heat=1.0), Want(7, 2, 3, heat=3.0), Want(1, 2, 2, heat=2.0)]
    order = [(t, w.expert) for t, _, w in hebf_reads(wants)]
    assert order == [(2, 7), (2, 1), (2, 5), (3, 7), (3, 5), (4, 5)]


def test_must_levels_are_read_expert_by_expert():
    wants = [Want(5, 4, 4, heat=1.0), Want(7, 4, 6, heat=3.0)]
    order = [(t, w.expert) for t, _, w in hebf_reads(wants)]
    assert order == [(4, 7), (4, 5), (5, 7), (6, 7)]


def test_lru_baseline_evicts_the_least_recently_used_whole_expert():
    layout = build_layout({"gate_up": (64, 64), "down": (64, 32)}, "msb", 64)
    cache = ExpertCache(layout, HostArena(12, layout.unit_bytes), layers=[0, 1], num_experts=4, eviction="lru")
    for e in (0, 1, 2):
        fill(cache, 0, e, 4, hot=0.0)
    cache.record_routing(0, np.array([1, 0, 1, 0]))  # experts 0 and 2 used; 1 is least recent
    cache.take_units(2, keep=(1, 0))
    assert list(cache.held[0, :3]) == [4, 0, 4]  # all of expert 1 went, not just its top planes


def test_best_effort_loads_only_evict_cheaper_chunks():
    cache = small_cache(4)
    fill(cache, 0, 0, 4, hot=5.0)
    worth_of_cold_plane = cache.value(1, 1, 3)  # a never-used expert's 4th plane
    assert cache.take_units(1, keep=(1, 1), worth=worth_of_cold_plane) is None
    assert cache.held[0, 0] == 4  # nothing was evicted for it
    assert cache.take_units(1, keep=(1, 1)) is not None  # a must-read still gets room
    assert cache.held[0, 0] == 3


def test_chunks_below_the_floor_are_evicted_together():
    cache = small_cache(8)
    cache.floor = 3  # a request with min_bits=3: an expert with 2 chunks is useless
    fill(cache, 0, 0, 4, hot=1.0)
    fill(cache, 0, 1, 3, hot=9.0)
    cache.take_units(2, keep=(1, 0))  # 1 unit is free; the 2nd comes from expert 0's 4th chunk
    assert list(cache.held[0, :2]) == [3, 3]
    cache.take_units(3, keep=(1, 0))  # then the coldest expert goes whole, not down to 2 chunks
    assert list(cache.held[0, :2]) == [0, 3]


def test_an_expert_in_nibble_form_keeps_chunks_0_to_3_together():
    """Its chunks 0..3 hold 4-bit codes, useless apart: below its floor. It loses upper chunks one by
    one, then goes whole (never to 3 or 2 chunks), and is no longer marked as rewritten."""
    cache = small_cache(8)
    fill(cache, 0, 0, 5, hot=1.0)
    fill(cache, 0, 1, 3, hot=9.0)
    cache.form[0, 0] = cpu.NIBBLE_FORM
    cache.take_units(1, keep=(1, 0))  # 0 free: the cold expert's 5th chunk goes
    assert list(cache.held[0, :2]) == [4, 3]
    # 2 more: upper chunks go before bases, so the hot expert's 3rd; then, with no upper chunk left,
    # the cold one's 4 together (a plane-form expert would have lost its 4th chunk instead)
    cache.take_units(2, keep=(1, 0))
    assert list(cache.held[0, :2]) == [0, 2] and cache.form[0, 0] == cpu.PLANE_FORM


def test_a_prefetch_that_found_no_room_does_not_release_an_expert_below_its_must():
    """The reader marks a best-effort read it skipped for lack of room as tried; a compute thread
    polling that expert must still wait for its must levels (it used to get 0 chunks, bench_budget
    at 1.2 GB)."""
    cache = small_cache(4)
    fill(cache, 0, 1, 4, hot=1.0)
    cache.pins[0, 1] += 1  # every unit pinned: no room for anything
    reader = Reader(None, cache)  # the skipped read never touches the container
    try:
        reader.submit(0, [Want(2, 3, 3, 1.0)], prefetch=True)
        reader.drain()
        assert reader.poll(0, [(2, 3, 3)]) == [None]
        cache.pins[0, 1] -= 1
    finally:
        reader.close()


def submitted(reader, wants, wait_upper=False):
    """The (expert, target) reads one submission queues, taken off the queue before the reader thread
    sees them."""
    with reader.cache.lock:
        reader.submit(0, wants, wait_upper=wait_upper)
        targets = sorted((item[2], item[3]) for item in reader._queue)
        reader._queue.clear()
    return targets


def queued_targets(cache, wants, wait_upper=False):
    reader = Reader(None, cache)
    try:
        return submitted(reader, wants, wait_upper)
    finally:
        reader.close()


def test_a_resident_base_is_not_read_again_under_a_wanted_upper_level():
    cache = small_cache(10)
    fill(cache, 0, 1, 2, hot=1.0)
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)]) == [(1, 3), (1, 4)]
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)], wait_upper=True) == [(1, 3), (1, 4)]


def test_optional_upper_levels_are_queued_only_into_unclaimed_free_units():
    """Reads for later tokens may only take free units: in a full cache they used to be queued and
    fail in the reader thread, ~50 per token (bench_budget at 2 GB), costing CPU and the GIL."""
    cache = small_cache(7)
    fill(cache, 0, 0, 4, hot=1.0)  # 3 units free
    # expert 1's base claims 2 of them, one is left for its 3rd chunk, none for the 4th
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)]) == [(1, 2), (1, 3)]
    fill(cache, 0, 2, 3, hot=1.0)  # full
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)]) == [(1, 2)]
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)], wait_upper=True) == [(1, 2), (1, 3), (1, 4)]


def test_no_reads_for_later_tokens_while_the_cache_evicts():
    """A level read for later tokens is the first victim of the next miss (upper levels go before
    bases): while the cache evicts, such reads landed and were evicted unused (bench_budget at 2 GB:
    ~150 per 32 tokens, mean bits still 4.00)."""
    cache = small_cache(10)
    fill(cache, 0, 0, 4, hot=1.0)
    fill(cache, 0, 1, 4, hot=1.5)
    fill(cache, 0, 2, 2, hot=2.0)  # full
    reader = Reader(None, cache)
    try:
        want = [Want(2, 2, 3, 1.0)]
        with cache.lock:
            cache.drop(0, 0)  # 4 units come free
        assert submitted(reader, want) == [(2, 3)]  # this layer's first submission: no history
        with cache.lock:
            cache.take_units(5, keep=(0, 3))  # a miss: one more unit than is free, so it evicts
            cache.drop(0, 1)  # and units come free again
        assert cache.evictions.sum() == 1 and len(cache.free) == 3
        assert submitted(reader, want) == []  # the cache evicted since this layer's last submission
        assert submitted(reader, want) == [(2, 3)]  # calm again
        assert submitted(reader, want, wait_upper=True) == [(2, 3)]  # the compute waits: always queued
    finally:
        reader.close()


def test_one_token_routing_groups_as_the_general_path():
    """Decode's fast grouping (moe._one_token) gives what the general sort-and-slice path gives:
    experts in the same order, each with its token, gate weight, bits and Want."""
    from edge_moe.runtime import moe

    rng = np.random.default_rng(3)
    for _ in range(20):
        experts = rng.choice(64, size=(1, 8), replace=False)
        weights = rng.random((1, 8)).astype(np.float32)
        weights[0, 2] = weights[0, 5]  # a tie in heat: broken by expert id on both paths
        bits = rng.integers(2, 9, size=(1, 8))
        fast = moe.group_by_expert(experts, weights, bits, 4)
        general = moe._many_tokens(experts, weights, bits, 4)
        assert [r.want for r in fast] == [r.want for r in general]
        for f, g in zip(fast, general, strict=True):
            assert f.tokens.tolist() == g.tokens.tolist() == [0]
            assert f.weights.tolist() == g.weights.tolist() and f.bits.tolist() == g.bits.tolist()


def test_bit_assignment_follows_the_cumulative_share_rule():
    """BitRequest.assign (numba) against the rule written in numpy: rank by weight (stable on ties),
    max_bits while the share before an expert is below quality."""
    from edge_moe.runtime.bit_policy import BitRequest

    def rule(weights, quality, lo, hi):
        share = weights / weights.sum(-1, keepdims=True)
        order = np.argsort(-share, axis=-1, kind="stable")
        ranked = np.take_along_axis(share, order, -1)
        high = np.empty(share.shape, dtype=bool)
        np.put_along_axis(high, order, np.cumsum(ranked, -1) - ranked < quality, -1)
        return np.where(high, hi, lo)

    rng = np.random.default_rng(5)
    for quality in (0.0, 0.3, 0.5, 0.9, 1.0):
        request = BitRequest.make(quality=quality, min_bits=3, max_bits=6)
        weights = rng.random((16, 8))
        weights[0] = 0.125  # all tied: the first ones in order get max_bits
        weights[1, :2] = [0.5, 0.5]
        assert request.assign(weights).tolist() == rule(weights, quality, 3, 6).tolist(), quality
    halves = np.array([[0.5, 0.5]])
    assert BitRequest.make(quality=0.5, min_bits=2, max_bits=8).assign(halves).tolist() == [[8, 2]]
    assert BitRequest.make(bits=5).assign(np.ones((2, 4))).tolist() == [[5] * 4] * 2


def test_claim_resident_pins_and_records_only_when_every_expert_holds_its_bits():
    from edge_moe.kernels.bookkeeping import unpin

    cache, other = small_cache(16), small_cache(16)
    for c in (cache, other):
        fill(c, 1, 0, 4, hot=1.0)
        fill(c, 1, 3, 3, hot=0.0)
    experts = np.array([3, 0])
    assert cache.claim_resident(1, experts, np.array([4, 2]), (3, 4)) is None  # expert 3 holds 3 chunks
    assert not cache.pins.any() and cache.hot[1].tolist() == [1.0, 0, 0, 0]
    units, forms, todo = cache.claim_resident(1, experts, np.array([3, 4]), (3, 4))
    assert cache.pins[1].tolist() == [1, 0, 0, 1] and (units == cache.units[1, experts]).all()
    assert not forms.any() and todo == 0  # no rewrite on this cache: nothing to put in another form
    other.record_routing(1, np.array([1, 0, 0, 1]))  # the general path's record of the same routing
    np.testing.assert_allclose(cache.hot, other.hot)
    assert (cache.last_used == other.last_used).all()
    unpin(cache.pins[1], experts)
    assert not cache.pins.any()
