"""Concurrent streaming clients against `edge-moe serve`, beside llama.cpp's `llama-server -np N` on the
same checkpoint, in one run.

    python tools/bench_serve.py MODEL.emoe [--gguf MODEL-Q4_0.gguf --llama-server PATH] [--clients 1 2 4 8]
        [--tokens 32] [--rounds 3] [--bits 4] [--budget 450MB]

Each server runs in its own process; for each client count, N threads stream a completion each at
once with the `openai` client (greedy, a different prompt each), after one warm-up round; each row
is the median of --rounds rounds by aggregate rate. Per row:
aggregate tokens/s (all completion tokens over the round's wall time), p50 and p95 time per output
token (the gaps between streamed chunks, pooled), mean time to first token, bytes read per token
(edge-moe's /metrics) and the server's peak RSS, sampled from outside every 5 ms from its start.
edge-moe runs twice: with every expert resident (no budget) and under --budget (default: a third of
the file). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from edge_moe.config import format_size, parse_size

PROMPTS = ["def parse(line):\n    ", "The history of the city begins", "import numpy as np\n\n",
           "Dear colleagues,\n", "class Queue:\n    def", "In this paper we study", "SELECT name FROM",
           "Once upon a time there"]


class Server:
    """A server process, its RSS sampled from outside until stopped."""

    def __init__(self, command: list[str], port: int, ready_path: str):
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url, self.peak, self.running = f"http://127.0.0.1:{port}", 0, True
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.proc.stderr.read()[-2000:]
                raise SystemExit(f"server did not start: {' '.join(command)}\n{log}")
            time.sleep(0.2)

    def _sample(self) -> None:
        proc = psutil.Process(self.proc.pid)
        while self.running:
            try:
                self.peak = max(self.peak, sum(p.memory_info().rss for p in [proc, *proc.children(True)]))
            except psutil.Error:
                return
            time.sleep(0.005)

    def stop(self) -> None:
        self.running = False
        self.proc.terminate()
        self.proc.wait(timeout=60)


def stream_one(url: str, model: str, prompt: str, tokens: int, extra: dict, out: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    stamps, usage = [], None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                       stream=True, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        usage = chunk.usage or usage
    out.update(t0=t0, stamps=stamps, end=time.perf_counter(),
               tokens=usage.completion_tokens if usage else len(stamps))


def round_of(url: str, model: str, n: int, tokens: int, extra: dict) -> dict:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream_one, args=(url, model, PROMPTS[i % len(PROMPTS)], tokens, extra,
                                                         results[i])) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    gaps = sorted(b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False))
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "p50": statistics.median(gaps) if gaps else 0.0,
            "p95": gaps[int(0.95 * (len(gaps) - 1))] if gaps else 0.0,
            "ttft": statistics.mean(r["stamps"][0] - r["t0"] for r in results if r["stamps"])}


def bytes_read(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.TransportError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("edgemoe_bytes_read_total")), None)
    return float(line.split()[1]) if line else None


def bench(name: str, server: Server, model: str, clients: list[int], tokens: int, extra: dict,
          rounds: int) -> list[str]:
    round_of(server.url, model, max(clients), tokens, extra)  # warm-up: caches, kernels, allocator
    rows = []
    for n in clients:
        before = bytes_read(server.url)
        runs = sorted((round_of(server.url, model, n, tokens, extra) for _ in range(rounds)),
                      key=lambda r: r["tok_s"])
        r = runs[len(runs) // 2]  # the median round by aggregate rate
        after = bytes_read(server.url)
        per_token = "" if before is None else format_size((after - before) / sum(x["tokens"] for x in runs))
        rows.append(f"| {name} | {n} | {r['tok_s']:.1f} | {1e3 * r['p50']:.1f} | {1e3 * r['p95']:.1f} | "
                    f"{1e3 * r['ttft']:.0f} | {per_token} | {format_size(server.peak)} |")
        print(rows[-1], flush=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help=".emoe file")
    ap.add_argument("--gguf", default=None, help="the same checkpoint for llama-server (e.g. at Q4_0)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per row; the median round is shown")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget", default=None, help="edge-moe's budgeted run (default: a third of the file)")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t")
    ap.add_argument("--context", type=int, default=512, help="per request")
    args = ap.parse_args()
    budget = parse_size(args.budget) if args.budget else Path(args.model).stat().st_size // 3
    batch = max(args.clients)
    print("| server | clients | aggregate tok/s | p50 ms/token | p95 ms/token | TTFT ms | bytes read/token | "
          "peak RSS |\n|---|---|---|---|---|---|---|---|", flush=True)
    runs = (("edge-moe, every expert resident", []),
            (f"edge-moe, --memory-budget {format_size(budget)}", ["--memory-budget", str(budget)]))
    for label, extra_flags in runs:
        port = free_port()
        server = Server([sys.executable, "-m", "edge_moe.cli", "serve", args.model, "--port", str(port),
                         "--max-batch", str(batch), "--max-context", str(args.context), "--model-name", "m",
                         *extra_flags], port, "/health")
        try:
            bench(f"{label}, {args.bits}-bit experts", server, "m", args.clients, args.tokens,
                  {"bits": args.bits}, args.rounds)
        finally:
            server.stop()
    if args.gguf and args.llama_server:
        for n in args.clients:  # -np fixes the slots: one server per client count
            port = free_port()
            server = Server([args.llama_server, "-m", args.gguf, "-np", str(n), "-t", str(args.threads),
                             "-c", str(n * args.context), "--port", str(port), "--host", "127.0.0.1"],
                            port, "/health")
            try:
                bench(f"llama-server -np {n} -t {args.threads}, {Path(args.gguf).name}", server, "m", [n],
                      args.tokens, {}, args.rounds)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
