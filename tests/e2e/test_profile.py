"""`edge-moe profile` on the demo model end to end: a trace that Chrome and Perfetto read, a summary whose
peak matches the kernel's high-water mark, and the plots."""

import json
import subprocess
import sys

import pytest

from edge_moe.api import DEMO_MODEL

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo model not built into the package")


def test_profile_writes_trace_summary_and_plots(tmp_path):
    out = tmp_path / "prof"
    r = subprocess.run([sys.executable, "-m", "edge_moe.cli", "profile", "--out", str(out), "--memory-budget",
                        "260MB", "--max-tokens", "16", "--quality", "0.5", "--min-bits", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# Profile of") and "wrote trace.json" in r.stderr
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    threads = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"MainThread", "edge-moe-reader"} <= threads
    spans = {e["name"] for e in events if e["ph"] == "X"}
    assert {"kernels", "dense weights", "prefill", "decode", "read", "experts"} <= spans
    assert {"memory", "expert I/O", "expert cache MB"} <= {e["name"] for e in events if e["ph"] == "C"}
    cache = [e["args"] for e in events if e["name"] == "expert cache MB"]
    assert cache[-1]["2-bit base"] > 0 and set(cache[-1]) == {"2-bit base", *(f"bit {b}" for b in range(3, 9))}
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")
    s = json.loads((out / "summary.json").read_text())
    assert s["samples"] > 10 and abs(s["peak_rss_sampled"] - s["vm_hwm"]) <= 0.02 * s["vm_hwm"]
    assert s["vm_hwm"] <= 260e6 and s["memory_budget"] == 260e6
    assert set(s["bits_histogram"]) <= {"3", "4", "5", "6", "7", "8"}  # --min-bits 3 held
    for plot in ("memory.png", "experts.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_profile_refuses_two_prompts(tmp_path):
    command = [sys.executable, "-m", "edge_moe.cli", "profile", "--out", str(tmp_path), "--prompt", "x",
               "--prompt-file", "f.txt"]
    r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --prompt or --prompt-file, not both" in r.stderr
