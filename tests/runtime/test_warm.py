"""The first compile: the groups of kernels a model is prepared with are all it calls, and the work is
dealt to children longest first."""

import json
import subprocess
import sys

import pytest

from edge_moe.runtime import warm

USED = """
import json, sys, edge_moe
from edge_moe.runtime import warm
dense_bits = int(sys.argv[2])
with edge_moe.load(sys.argv[1], dense_bits=dense_bits) as m:
    for bits in (2, 3, 4, 8):  # every width class, a prompt of several tokens (prefill) and decode steps
        list(m.generate_ids(list(range(3, 40)), max_tokens=3, bits=bits))
used = {f.py_func.__qualname__ for f in warm.ENTRY_POINTS if f.overloads}
prepared = {f.py_func.__qualname__ for g in warm.groups_for("cpu", dense_bits, True) for f in warm.GROUPS[g]}
print(json.dumps({"used": sorted(used), "unprepared": sorted(used - prepared)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dense_bits", [8, 6, 4, 16])
def test_a_model_calls_only_the_kernels_it_was_prepared_with(wide_model, dense_bits):
    # in a fresh process: this one has called every kernel; one the model calls but load() did not
    # prepare would compile inside a budgeted process (LLVM's ~200 MB)
    run = subprocess.run([sys.executable, "-c", USED, str(wide_model), str(dense_bits)], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "_ffn_kernel" in result["used"] and "decode_attention" in result["used"]
    assert result["unprepared"] == []


def test_groups_are_dealt_longest_first_to_the_least_loaded_child():
    names = ["bookkeeping", "experts", "attention", "dense8"]
    shares = warm._share_out(names, 2)
    assert shares[0] == ["experts"] and sorted(shares[1]) == ["attention", "bookkeeping", "dense8"]
    assert warm._share_out(names, 1) == [sorted(names, key=lambda n: -warm.COST[n])]
    assert warm._share_out(["dense4"], 2) == [["dense4"]]  # no idle child is started


def test_every_group_is_named_for_some_model():
    named = {g for bits in (4, 6, 8, 16) for g in warm.groups_for("cpu", bits, True)}
    assert named | {"forms"} == set(warm.GROUPS) and set(warm.COST) == set(warm.GROUPS)


@pytest.mark.slow
def test_compile_children_die_with_their_parent(tmp_path):
    import os
    import signal
    import time

    import psutil

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}  # empty: the first run compiles
    command = [sys.executable, "-m", "edge_moe.cli", "run", "--prompt", "x", "--max-tokens", "1"]
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    for _ in range(300):  # the children start once the parent has imported torch and numba
        children = psutil.Process(parent.pid).children()
        if children:
            break
        time.sleep(0.1)
    assert children, "no compile child was started"
    parent.send_signal(signal.SIGKILL)  # no cleanup code of the parent runs
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
