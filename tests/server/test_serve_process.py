"""`edge-moe serve` as users start it: a child process under --memory-budget, four streaming clients at
once; its RSS, sampled from outside, stays under the budget (400 MB: the plan holds four KV caches, and
a fresh install's process baseline is up to ~230 MB here)."""

import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from edge_moe.api import DEMO_MODEL

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo model not built into the package")
BUDGET = 400e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_keeps_its_budget_under_concurrent_streams():
    port = free_port()
    command = [sys.executable, "-m", "edge_moe.cli", "serve", "--port", str(port), "--memory-budget", "400MB",
               "--max-batch", "4"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    peak, url = 0, f"http://127.0.0.1:{port}"
    try:
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 240
        while True:
            peak = max(peak, proc.memory_info().rss)
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.005)
        texts = [None] * 4

        def stream(i: int) -> None:
            body = {"prompt": f"def f{i}(x):\n    ", "max_tokens": 64, "stream": True, "temperature": 0}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                texts[i] = [line for line in r.iter_lines() if line.startswith("data:")]

        clients = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for c in clients:
            c.start()
        while any(c.is_alive() for c in clients):
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)
        assert all(t and t[-1] == "data: [DONE]" for t in texts)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        reported = float(next(line.split()[1] for line in metrics.splitlines()
                              if line.startswith("edgemoe_peak_rss_bytes")))
        assert "edgemoe_completion_tokens_total 256" in metrics
    finally:
        child.terminate()
        child.wait(timeout=30)
    assert peak <= BUDGET and reported <= BUDGET, (peak, reported)
