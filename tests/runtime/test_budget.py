"""The memory budget: refused when too small, held under load, and offload changes no token."""

import json
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import edge_moe
from edge_moe.config import parse_size
from edge_moe.errors import BudgetError, BudgetWarning, UsageError
from edge_moe.format.nested import MAX_BITS
from edge_moe.model.host_layers import kv_bytes, route
from edge_moe.runtime.memory import MIN_MARGIN, activation_bytes, current_rss
from edge_moe.runtime.warm import prepare

CHILD = """
import json, resource, subprocess, sys
child = subprocess.run([sys.executable, "-c", *sys.argv[1:]], capture_output=True, text=True)
print(json.dumps({"rc": child.returncode, "out": child.stdout, "err": child.stderr[-2000:],
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

WORKLOAD = """
import json, os, sys, numpy as np, edge_moe, edge_moe.api  # import numba before measuring
from edge_moe.runtime.warm import groups_for, prepare
from edge_moe.runtime.memory import current_rss, release_code_pages
rss0 = current_rss()
prepare(groups_for("cpu", 8, True))  # what load() does first: the kernels the model calls, compiled in
# child processes if numba's cache lacks them; then it unmaps LLVM's idle code pages
release_code_pages()
rss1 = current_rss()
budget = rss1 + 114 * 10**6  # dense, KV, activations and margin take ~106 MB: ~8 MB of cache
m = edge_moe.load({path!r}, memory_budget=budget)
rng = np.random.default_rng(0)
for seed in range(3):  # random prompts and sampling: routing wanders over all experts
    prompt = rng.integers(0, 512, size=40).tolist()
    list(m.generate_ids(prompt, max_tokens=24, temperature=1.5, seed=seed, quality=0.6))
print(json.dumps({{"budget": budget, "peak": m.stats["peak_rss"], "process_peak": m.stats["peak_rss_process"],
                  "kernels": rss1 - rss0, "cache": m.memory_plan.cache_bytes,
                  "evictions": int(m.cache.evictions.sum()), "bytes_read": m.reader.bytes_read}}))
sys.stdout.flush()
os._exit(0)  # as the edge-moe script does (cli.console): a CUDA torch's C++ destructors add ~120 MB at exit
"""


def tight_budget(model_path, cache_bytes: int) -> int:
    """A budget leaving `cache_bytes` for experts in this process (what plan_memory will compute)."""
    with edge_moe.load(model_path) as probe:
        cfg, dense = probe.config, sum(t.nbytes for t in probe.decoder.w.values())
        kv = kv_bytes(cfg, probe.max_context)
        acts = activation_bytes(cfg, probe.prefill_chunk, probe.max_context)
    return current_rss() + dense + kv + acts + MIN_MARGIN + cache_bytes


def test_refuses_a_budget_that_cannot_hold_one_layer(wide_model):
    with pytest.raises(BudgetError, match=r"budget 150.00 MB is below the .* minimum .* dense .* KV cache "
                                          r".* one layer's 2 experts at 2 bits .* raise --memory-budget"):
        edge_moe.load(wide_model, memory_budget="150MB")


def test_budget_holds_under_randomized_routing(wide_model):
    prepare()  # a warm kernel cache: no compile child for wait4's maxrss to count
    code = WORKLOAD.format(path=str(wide_model))
    r = json.loads(subprocess.run([sys.executable, "-c", CHILD, code], capture_output=True, text=True,
                                  timeout=600).stdout)
    assert r["rc"] == 0, r["err"]
    stats = json.loads(r["out"])
    assert stats["cache"] < 20 * 10**6 and stats["evictions"] > 0  # experts (21 MB at 8 bits) streamed
    # the kernel's own peak RSS of the whole child process, and the sampling thread's
    assert stats["peak"] <= stats["budget"] and r["maxrss"] <= stats["budget"], (stats, r["maxrss"])
    assert stats["process_peak"] <= stats["budget"]
    # the process never resets its high-water mark, so getrusage (as /usr/bin/time -v) sees the true peak
    assert r["maxrss"] >= stats["process_peak"] - 2**20, (stats, r["maxrss"])


def test_a_cold_kernel_cache_costs_the_budgeted_process_nothing(wide_model, tmp_path):
    # the first run on a machine compiles the kernels; LLVM's memory (~170-270 MB, kept by numba)
    # must go to a child process: this process grows by what a warm cache costs it, and holds the budget
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", WORKLOAD.format(path=str(wide_model))], env=env,
                           capture_output=True, text=True, timeout=900) for _ in ("cold", "warm")]
    cold, warm = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert "compiling the cpu kernels" in runs[0].stderr and "compiling" not in runs[1].stderr
    assert cold["kernels"] <= warm["kernels"] + 16 * 2**20, (cold, warm)
    assert cold["process_peak"] <= cold["budget"] and warm["process_peak"] <= warm["budget"]
    # and nothing compiles later in the budgeted process (every kernel the model calls was warmed)
    growth = {k: r["process_peak"] - r["kernels"] for k, r in (("cold", cold), ("warm", warm))}
    assert growth["cold"] <= growth["warm"] + 16 * 2**20, (cold, warm)  # 21.6 MB more with byte_matmul unwarmed


def test_offload_on_and_off_give_identical_tokens(wide_model):
    """Same kernels, same tokens. A model held whole is rewritten into the cpu kernels' nibble form, which
    sums in another order: on this random model that moved step 8's logits by ~0.005 and flipped its top
    two (0.004 apart), so the whole model keeps the planes here, as the budgeted one does."""
    prompt = list(range(3, 43))
    with edge_moe.load(wide_model, resident_forms=False) as full:
        want = list(full.generate_ids(prompt, max_tokens=16, bits=4))
    with edge_moe.load(wide_model, memory_budget=tight_budget(wide_model, 2 * 10**6)) as small:
        got = list(small.generate_ids(prompt, max_tokens=16, bits=4))
        assert small.cache.evictions.sum() > 0
        assert set(small.stats["bits_histogram"]) == {4}
    assert got == want


def test_two_requests_with_different_knobs_get_different_bits(wide_model):
    prompt = list(range(10, 30))
    with edge_moe.load(wide_model) as m:
        list(m.generate_ids(prompt, max_tokens=8, bits=3))
        fixed = m.stats["bits_histogram"]
        list(m.generate_ids(prompt, max_tokens=8, quality=0.5, min_bits=2, max_bits=6))
        dual = m.stats["bits_histogram"]
    assert set(fixed) == {3}
    # the top expert of each token wants 6 bits, the tail 2; a quality request computes with the
    # levels already resident when higher ones are late, so widths in between appear too
    assert {2, 6} <= set(dual) <= {2, 3, 4, 5, 6}


def test_dual_routing_gives_each_token_expert_pair_its_own_bits(wide_model):
    ids = list(range(40, 72))  # a 32-token prefill: every expert sees several tokens
    with edge_moe.load(wide_model) as m:
        m.logits(ids, quality=0.5, min_bits=2, max_bits=6, wait=True)
        pairs = len(ids) * len(m.config.moe_layers)
        # top-2 routing, quality 0.5: the heavier expert of each token gets 6 bits, the other 2
        assert m.stats["bits_histogram"] == {2: pairs, 6: pairs}


def test_bad_knobs_are_refused(wide_model):
    with edge_moe.load(wide_model) as m:
        for knobs, message in [({"bits": 4, "quality": 0.5}, "either bits or quality"),
                               ({"quality": 1.5}, "quality=1.5 is out of range"),
                               ({"quality": 0.5, "min_bits": 6, "max_bits": 4}, "min_bits=6 is above"),
                               ({"min_bits": 3}, "give --quality too"),
                               ({"temperature": -1}, "--temperature -1"), ({"top_p": 0}, "--top-p 0"),
                               ({"max_tokens": -2}, "--max-tokens -2")]:
            with pytest.raises(UsageError, match=message):
                list(m.generate_ids([1, 2, 3], **{"max_tokens": 2, **knobs}))


def test_next_layer_is_prefetched_from_the_current_hidden_state(wide_model):
    with edge_moe.load(wide_model, streaming="hebf") as m:
        x = np.random.default_rng(0).standard_normal((1, m.config.hidden_size)).astype(np.float32)
        x *= 16 / np.linalg.norm(x)
        weights, experts = route(x, m.pipeline.routers[0], m.config)
        m.pipeline(0, x, weights, experts)
        m.reader.drain()
        predicted = route(x, m.pipeline.routers[1], m.config)[1][0].tolist()
        held = dict(zip(m.cache.layers, m.cache.held, strict=True))
        assert all(held[1][e] >= 2 for e in predicted)
        assert int((held[1] > 0).sum()) == len(predicted)  # nothing else of layer 1 was read
        assert np.all(held[2] == 0)  # no prefetch beyond the next layer


def test_a_budget_that_holds_every_level_loads_them_all_in_the_background(wide_model):
    with edge_moe.load(wide_model, memory_budget=tight_budget(wide_model, 40 * 10**6), streaming="hebf") as m:
        m.reader.drain()  # no forward ran: only the background fill read
        assert (m.cache.held == MAX_BITS).all()
        assert m.reader.bytes_read == m.layout.bytes_for_bits(MAX_BITS) * m.cache.held.size
        prompt = list(range(5, 25))
        list(m.generate_ids(prompt, max_tokens=4, bits=8))
        assert m.stats["bytes_read"] == 0 and m.stats["hit_rate"] == 1.0
    with edge_moe.load(wide_model, memory_budget=tight_budget(wide_model, 10 * 10**6), streaming="hebf") as m:
        m.reader.drain()
        assert m.cache.held.sum() == 0  # a budget that cannot hold it all reads only on demand
    with edge_moe.load(wide_model, memory_budget=tight_budget(wide_model, 40 * 10**6),
                       streaming="hebf-no-prefetch") as m:
        m.reader.drain()
        assert m.cache.held.sum() == 0  # no speculative reads


@pytest.mark.parametrize("streaming", ["lru", "on-demand", "hebf-no-prefetch"])
def test_baseline_policies_give_the_same_tokens(wide_model, streaming):
    prompt = list(range(5, 25))
    with edge_moe.load(wide_model) as full:
        want = list(full.generate_ids(prompt, max_tokens=8, bits=4))
    with edge_moe.load(wide_model, memory_budget=tight_budget(wide_model, 2 * 10**6), streaming=streaming) as m:
        assert list(m.generate_ids(prompt, max_tokens=8, bits=4)) == want
        if streaming == "on-demand":
            assert m.cache.held.sum() == 0  # nothing kept between uses
            assert m.stats["hit_rate"] == 0.0
        if streaming == "hebf-no-prefetch":
            assert not m.pipeline.prefetch


@pytest.mark.parametrize("kernel_counter", [True, False], ids=["vmhwm", "sampler"])
def test_peak_rss_sees_short_spikes_and_never_resets_the_process_peak(kernel_counter, monkeypatch):
    from edge_moe.runtime import memory

    if not kernel_counter:
        monkeypatch.setattr(memory, "_has_hwm", lambda: False)
    elif not memory._has_hwm():
        pytest.skip("this kernel keeps no VmHWM")
    rss = memory.PeakRss(interval=0.001)
    base = memory.current_rss()

    def spike(mib: int) -> None:
        block = np.ones(mib * 2**20 // 8)  # touched
        time.sleep(0.05)  # the sampler's turn
        del block

    spike(200)
    assert rss.peak >= base + 190 * 2**20 and rss.process_peak >= base + 190 * 2**20
    rss.start()  # a request: its peak counts from here, the process's does not restart
    assert rss.peak < base + 100 * 2**20 and rss.process_peak >= base + 190 * 2**20
    spike(300)
    assert rss.peak >= base + 290 * 2**20
    rss.stop()


def load_near_minimum(path, extra: int):
    """A model loaded with an expert cache at most `extra` bytes above its minimum (one layer's experts at
    2 bits); retried, since this process's RSS, part of the plan, moves from load to load."""
    budget = 10**6
    for _ in range(8):
        try:
            m = edge_moe.load(path, memory_budget=budget)
        except BudgetError as e:
            budget = parse_size(re.search(r"the ([\d.]+ [KMG]?B) minimum", str(e)).group(1)) + extra
            continue
        plan = m.memory_plan
        spare = (plan.cache_units - plan.min_units) * plan.unit_bytes - extra
        if spare <= plan.unit_bytes:
            return m
        m.close()
        budget -= spare
    raise AssertionError("the budget's minimum kept moving")


def test_a_budget_that_narrows_asked_widths_says_so_once(wide_model):
    prompt = list(range(3, 43))
    with load_near_minimum(wide_model, 3 * 10**6) as m:  # experts take 21 MB at 8 bits
        with pytest.warns(BudgetWarning, match=r"ran below the width asked \(mean [2-7]\.\d+ bits, 8.00"):
            list(m.generate_ids(prompt, max_tokens=8))  # the default: 8 bits
        assert m.stats["degraded_pairs"] > 0 and m.stats["wanted_mean_bits"] == 8
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            list(m.generate_ids(prompt, max_tokens=8))  # once per model
    with load_near_minimum(wide_model, 3 * 10**6) as m, warnings.catch_warnings():
        warnings.simplefilter("error")  # a quality request computes with what is resident: by design
        list(m.generate_ids(prompt, max_tokens=8, quality=0.5))
        assert m.stats["degraded_pairs"] > 0


@pytest.mark.parametrize("dense_bits", [4, 6, 8, 16])
def test_the_plan_knows_the_dense_bytes_before_reading_them(big_vocab_model, dense_bits):
    from edge_moe.model.load import dense_nbytes

    with edge_moe.load(big_vocab_model, dense_bits=dense_bits, max_context=256) as m:
        held = sum(t.nbytes for t in m.decoder.w.values())
        assert dense_nbytes(m.container, 4, dense_bits) == held == m.memory_plan.dense


REFUSED = """
import json, sys, edge_moe, edge_moe.api  # numba imported before measuring, as load() measures
from edge_moe.errors import BudgetError
from edge_moe.runtime.memory import current_rss
from edge_moe.runtime.warm import groups_for, prepare
prepare(groups_for("cpu", 8, True))
budget = current_rss() + 25 * 10**6  # under the dense part alone (33 MB at 8 bits)
try:
    edge_moe.load(sys.argv[1], memory_budget=budget, max_context=256)
    print(json.dumps({"refused": False}))
except BudgetError as e:
    print(json.dumps({"refused": True, "budget": budget, "message": str(e)}))
"""


def test_a_refused_budget_is_never_exceeded_on_the_way(big_vocab_model):
    prepare()  # a warm kernel cache: no compile child for wait4's maxrss to count
    r = json.loads(subprocess.run([sys.executable, "-c", CHILD, REFUSED, str(big_vocab_model)],
                                  capture_output=True, text=True, timeout=600).stdout)
    assert r["rc"] == 0, r["err"]
    out = json.loads(r["out"])
    assert out["refused"] and "below the" in out["message"]
    assert r["maxrss"] <= out["budget"], (r["maxrss"], out)  # refused before the weights were read
