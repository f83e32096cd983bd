"""Eviction order of the expert cache and the hottest-expert-bit-first read order."""

import numpy as np

from edge_moe.format.layout import build_layout
from edge_moe.runtime.arena import HostArena
from edge_moe.runtime.expert_cache import FILE_FORM, ExpertCache
from edge_moe.runtime.reader import Reader, Want, hebf_reads

INF = float("inf")


def small_cache(n_units=10, **kwargs):
    layout = build_layout({"gate_up": (64, 64), "down": (64, 32)}, "msb", 64)
    return ExpertCache(layout, HostArena(n_units, layout.unit_bytes), layers=[0, 1], num_experts=4, **kwargs)


def fill(cache, layer, expert, chunks):
    """Read `chunks` of an expert (nothing is read: the units are only taken and committed)."""
    cache.commit(layer, expert, *cache.reserve(layer, expert, chunks, worth=INF))


def heat(cache, layer, counts: dict):
    """One forward's routing counts into a layer's hotness (from zero: hot = counts)."""
    row = np.zeros(4, np.int64)
    for e, n in counts.items():
        row[e] = n
    cache.record_routing(layer, row)


def pin(cache, layer, experts):
    """Acquire experts without routing them (no hotness change); the lease releases them."""
    experts = np.array(experts, np.int64)
    return cache.acquire(layer, experts, np.zeros(len(experts), np.int64), np.full(len(experts), 2))


def take(cache, layer, expert, n, worth=INF, floor=2):
    """n units for an expert that holds none (as a reader's reservation), committed."""
    got = cache.reserve(layer, expert, n, worth=worth, floor=floor)
    if got is not None:
        cache.commit(layer, expert, *got)
    return got


def free_units(cache) -> int:
    return cache.snapshot(0)[1]


def test_eviction_drops_top_planes_of_cold_experts_first_and_bases_last():
    cache = small_cache()
    fill(cache, 0, 0, 6)  # cold expert at 6 bits
    fill(cache, 1, 2, 4)  # hot expert at 4 bits
    heat(cache, 0, {0: 1})
    heat(cache, 1, {2: 10})
    states = []
    for _ in range(6):
        assert cache.reserve(0, 3, 1, worth=INF) is not None  # taken for a read, never committed
        states.append((int(cache.held[0, 0]), int(cache.held[1, 2])))
    # a top chunk is worth hot * 2^-(chunk): the cold expert's (1 * 2^-5 .. 1 * 2^-2) go before
    # the hot expert's 10 * 2^-3 = 1.25, so the cold one falls to its base first
    assert states[:4] == [(5, 4), (4, 4), (3, 4), (2, 4)]
    assert states[4:] == [(2, 3), (2, 2)]
    take(cache, 1, 3, free_units(cache) + 1)
    assert cache.held[0, 0] == 0 and cache.held[1, 2] == 2  # the colder base went first
    assert list(cache.evictions[:2]) == [1, 1]


def test_pinned_experts_are_never_evicted():
    cache = small_cache(4)
    fill(cache, 0, 1, 4)
    lease = pin(cache, 0, [1])
    assert take(cache, 0, 2, 1) is None
    assert cache.held[0, 1] == 4
    cache.release(lease)
    assert take(cache, 0, 2, 1) is not None and cache.held[0, 1] == 3


def test_hotness_is_an_exponential_moving_average():
    cache = small_cache()
    cache.record_routing(1, np.array([2, 0, 0, 1]))
    cache.record_routing(1, np.array([0, 0, 0, 1]))
    # the value of a base chunk is 4x hotness (+1e-3): it reads the average back
    values = [cache.value(1, e, 0) / 4 - 1e-3 for e in range(4)]
    np.testing.assert_allclose(values, [2 * cache.decay, 0, 0, cache.decay + 1], atol=1e-12)


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
        fill(cache, 0, e, 4)
    cache.record_routing(0, np.array([1, 0, 1, 0]))  # experts 0 and 2 used; 1 is least recent
    take(cache, 1, 0, 2)
    assert list(cache.held[0, :3]) == [4, 0, 4]  # all of expert 1 went, not just its top planes


def test_best_effort_loads_only_evict_cheaper_chunks():
    cache = small_cache(4)
    fill(cache, 0, 0, 4)
    heat(cache, 0, {0: 5})
    worth_of_cold_plane = cache.value(1, 1, 3)  # a never-used expert's 4th plane
    assert take(cache, 1, 1, 1, worth=worth_of_cold_plane) is None
    assert cache.held[0, 0] == 4  # nothing was evicted for it
    assert take(cache, 1, 1, 1) is not None  # a must-read still gets room
    assert cache.held[0, 0] == 3


def test_chunks_below_the_floor_are_evicted_together():
    cache = small_cache(8)
    fill(cache, 0, 0, 4)
    fill(cache, 0, 1, 3)
    heat(cache, 0, {0: 1, 1: 9})
    # a request with min_bits=3 (floor 3): an expert with 2 chunks is useless to it
    take(cache, 1, 0, 2, floor=3)  # 1 unit is free; the 2nd comes from expert 0's 4th chunk
    assert list(cache.held[0, :2]) == [3, 3]
    take(cache, 1, 1, 3, floor=3)  # then the coldest expert goes whole, not down to 2 chunks
    assert list(cache.held[0, :2]) == [0, 3]


class FourTogether:
    """A backend's resident forms with one form (1) whose chunks 0..3 are useless apart, as the cpu
    kernels' nibble form: taken at any width from 4 chunks held."""

    def __init__(self):
        self.table = np.zeros((2, 9, 9), np.int8)
        self.table[:, 4:, :] = 1
        self.together = np.array([0, 4])
        self.rewrites = []

    def want(self, form, held, widths):
        return int(self.table[form, held, max(widths)])

    def rewrite(self, units, old, new):
        self.rewrites.append((old, new))


def test_an_expert_in_nibble_form_keeps_chunks_0_to_3_together():
    """Its chunks 0..3 hold 4-bit codes, useless apart: below its floor. It loses upper chunks one by
    one, then goes whole (never to 3 or 2 chunks), and is no longer marked as rewritten."""
    forms = FourTogether()
    cache = small_cache(8, forms=forms)
    fill(cache, 0, 0, 5)
    fill(cache, 0, 1, 3)
    lease = pin(cache, 0, [0])
    cache.prepare_form(lease, 0, [4])  # the backend's rewrite into its form 1
    cache.release(lease)
    assert forms.rewrites == [(FILE_FORM, 1)] and cache.form[0, 0] == 1
    heat(cache, 0, {0: 1, 1: 9})
    assert cache.reserve(1, 0, 1, worth=INF)  # 0 free: the cold expert's 5th chunk goes
    assert list(cache.held[0, :2]) == [4, 3]
    # 2 more: upper chunks go before bases, so the hot expert's 3rd; then, with no upper chunk left,
    # the cold one's 4 together (a plane-form expert would have lost its 4th chunk instead)
    assert cache.reserve(1, 1, 2, worth=INF)
    assert list(cache.held[0, :2]) == [0, 2] and cache.form[0, 0] == FILE_FORM


def test_a_prefetch_that_found_no_room_does_not_release_an_expert_below_its_must():
    """The reader marks a best-effort read it skipped for lack of room as tried; a compute thread
    polling that expert must still wait for its must levels (it used to get 0 chunks, bench_budget
    at 1.2 GB)."""
    cache = small_cache(4)
    fill(cache, 0, 1, 4)
    lease = pin(cache, 0, [1])  # every unit pinned: no room for anything
    reader = Reader(None, cache)  # the skipped read never touches the container
    try:
        reader.submit(0, [Want(2, 3, 3, 1.0)], prefetch=True)
        reader.drain()
        assert reader.poll(0, [(2, 3, 3)]) == [None]
        cache.release(lease)
    finally:
        reader.close()


def submitted(reader, wants, wait_upper=False):
    """The (expert, target) reads one submission queues, taken off the queue before the reader thread
    sees them."""
    with reader._cv:  # re-entrant: submit takes it too
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
    fill(cache, 0, 1, 2)
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)]) == [(1, 3), (1, 4)]
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)], wait_upper=True) == [(1, 3), (1, 4)]


def test_optional_upper_levels_are_queued_only_into_unclaimed_free_units():
    """Reads for later tokens may only take free units: in a full cache they used to be queued and
    fail in the reader thread, ~50 per token (bench_budget at 2 GB), costing CPU and the GIL."""
    cache = small_cache(7)
    fill(cache, 0, 0, 4)  # 3 units free
    # expert 1's base claims 2 of them, one is left for its 3rd chunk, none for the 4th
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)]) == [(1, 2), (1, 3)]
    fill(cache, 0, 2, 3)  # full
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)]) == [(1, 2)]
    assert queued_targets(cache, [Want(1, 2, 4, 1.0)], wait_upper=True) == [(1, 2), (1, 3), (1, 4)]


def test_no_reads_for_later_tokens_while_the_cache_evicts():
    """A level read for later tokens is the first victim of the next miss (upper levels go before
    bases): while the cache evicts, such reads landed and were evicted unused (bench_budget at 2 GB:
    ~150 per 32 tokens, mean bits still 4.00)."""
    cache = small_cache(10)
    fill(cache, 0, 0, 4)
    fill(cache, 0, 1, 4)
    fill(cache, 0, 2, 2)  # full
    heat(cache, 0, {0: 1, 1: 1, 2: 2})
    reader = Reader(None, cache)
    try:
        want = [Want(2, 2, 3, 1.0)]
        cache.release(pin(cache, 0, [0]), drop=True)  # 4 units come free
        assert submitted(reader, want) == [(2, 3)]  # this layer's first submission: no history
        take(cache, 0, 3, 5)  # a miss: one more unit than is free, so it evicts
        cache.release(pin(cache, 0, [1]), drop=True)  # and units come free again
        assert cache.evictions.sum() == 1 and free_units(cache) == 3
        assert submitted(reader, want) == []  # the cache evicted since this layer's last submission
        assert submitted(reader, want) == [(2, 3)]  # calm again
        assert submitted(reader, want, wait_upper=True) == [(2, 3)]  # the compute waits: always queued
    finally:
        reader.close()


def test_one_token_routing_groups_as_the_general_path():
    """Decode's routing (one token: the gate's order) is the general grouping's once put hottest first:
    the same experts with the same token, gate weight, bits and heat."""
    from edge_moe.runtime import moe

    rng = np.random.default_rng(3)
    for _ in range(20):
        experts = rng.choice(64, size=(1, 8), replace=False)
        weights = rng.random((1, 8)).astype(np.float32)
        weights[0, 2] = weights[0, 5]  # a tie in heat: broken by expert id on both paths
        bits = rng.integers(2, 9, size=(1, 8))
        one = moe.group_by_expert(experts, weights, bits)
        two = moe.group_by_expert(np.repeat(experts, 2, 0), np.repeat(weights, 2, 0), np.repeat(bits, 2, 0))
        order = one.hottest_first()
        assert one.experts[order].tolist() == two.experts.tolist()
        assert one.want[order].tolist() == two.want.tolist()
        assert two.tokens.tolist() == [0, 1] * 8 and two.ptr.tolist() == list(range(0, 17, 2))
        assert one.weights[order].tolist() == two.weights[::2].tolist()
        assert one.bits[order].tolist() == two.bits[::2].tolist()


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


def test_acquire_pins_records_routing_and_says_whether_every_expert_holds_its_bits():
    cache, other = small_cache(16), small_cache(16)
    for c in (cache, other):
        fill(c, 1, 0, 4)
        fill(c, 1, 3, 3)
    experts, counts = np.array([3, 0]), np.array([1, 2])
    short = cache.acquire(1, experts, counts, np.array([4, 2]))  # expert 3 holds 3 chunks, wants 4
    assert not short.ready and short.held.tolist() == [3, 4]
    ready = cache.acquire(1, experts, counts, np.array([3, 4]))
    assert ready.ready and ready.todo == 0  # no forms on this cache: nothing to rewrite
    assert (ready.units[:, :3] >= 0).all() and (ready.units[1] >= 0).sum() == 4
    for _ in range(2):  # the general path's record of the same routing, twice
        other.record_routing(1, np.array([2, 0, 0, 1]))
    assert [cache.value(1, e, 0) for e in range(4)] == [other.value(1, e, 0) for e in range(4)]
    # pinned twice: with the rest of the cache pinned too, a reservation finds no room until both
    # leases let go of an expert
    fill(cache, 0, 1, 8)
    fill(cache, 0, 0, 1)
    pin(cache, 0, [0, 1])
    assert take(cache, 0, 2, 1) is None
    cache.release(short)
    assert take(cache, 0, 2, 1) is None
    cache.release(ready, which=[0])  # expert 3: its upper chunk may go now
    assert take(cache, 0, 2, 1) is not None and cache.held[1, 3] == 2
    cache.release(ready)
    cache.release(ready)  # a second release of the same lease changes nothing
    assert take(cache, 0, 3, 1) is not None and cache.held[1, 0] == 3
