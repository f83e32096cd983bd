"""Decode under a memory budget: HEBF with dynamic bits vs whole-expert LRU vs load on demand.

    python tools/bench_budget.py MODEL.emoe --budgets 2GB 3GB 16GB [--tokens 32] [--repeats 3] [--resident]
    python tools/bench_budget.py MODEL.emoe --quality-model HF_DEMO_DIR     # adds the quality table
    python tools/bench_budget.py M.emoe --skip-speed --quality-model edge_moe/data/demo.emoe --quality-text T
    python tools/bench_budget.py MODEL.emoe --budgets 1.5GB --policies a b --min-bits 4 --max-bits 5

Every (budget, policy) runs in a fresh child process, the policies of a budget taking turns repeat
by repeat (this machine drifts by 10-30% over minutes): tokens/s, stall fraction, bytes read per
token, and peak RSS twice (the child's own sampling thread, and the kernel's maximum RSS of the
child from wait4), side by side in one markdown table, after the disk's own rate for expert reads.
Expert reads bypass the OS page cache (drop_page_cache: direct I/O) so that they measure the disk,
as on a device whose RAM cannot also cache the model file; pass --page-cache to allow it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

POLICIES = {  # name -> (streaming, knobs)
    "(a) HEBF, dynamic bits": ("hebf", "dynamic"),
    "(a') (a) without prefetch": ("hebf-no-prefetch", "dynamic"),
    "(b) LRU experts, 4 bits": ("lru", {"bits": 4}),
    "(c) on demand, 4 bits": ("on-demand", {"bits": 4}),
}
RESIDENT = "(d) all preloaded, 4 bits"  # no reads while timed: the no-streaming reference

CHILD = """
import json, sys, numpy as np, edge_moe
args = json.loads(sys.argv[1])
m = edge_moe.load(args["model"], memory_budget=args["budget"], streaming=args["streaming"],
                  backend=args["backend"], max_context=args["context"], drop_page_cache=args["drop"])
if args["preload"]:  # every level of every expert before timing (the budget must hold them)
    m.preload(8)
rng = np.random.default_rng(0)
prompt = rng.integers(0, m.config.vocab_size, size=args["prompt"]).tolist()
list(m.generate_ids(prompt, max_tokens=args["warmup"], **args["knobs"]))  # fill the cache
list(m.generate_ids(prompt[: args["prompt"] // 2], max_tokens=args["tokens"], **args["knobs"]))
print(json.dumps({**m.stats, "plan": m.memory_plan.describe()}), flush=True)
import os; os._exit(0)  # as the edge-moe script exits: no C++ destructors (a CUDA torch's add ~120 MB)
"""


def run_child(spec: dict) -> dict:
    """Run one configuration in a fresh process; reap it with wait4 to get its own peak RSS."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().strip().splitlines()
    if proc.returncode:
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    stats = json.loads(out.strip().splitlines()[-1])
    stats["maxrss_kernel"] = usage.ru_maxrss * 1024
    return stats


def _label(policy: str) -> str:
    """The short name of a policy row: "(a') ..." -> "a'"."""
    return policy.split()[0].strip("()")


def _fmt_gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def row(budget: str, name: str, runs: list[dict]) -> str:
    """Medians over the runs; peak RSS is the largest of any run."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return f"| {budget} | {name} | refused or failed: {bad[0]['error'][:150]} |||||||"
    for r in runs:  # the reader thread: share of the run spent in reads, and its read rate
        r["reader_busy"] = r["read_s"] / max(r["prefill_s"] + r["decode_s"], 1e-9)
        r["read_rate"] = r["bytes_read"] / r["read_s"] if r["read_s"] > 0 else 0.0
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("decode_tokens_per_s", "stall_fraction", "bytes_read_per_token", "mean_bits", "hit_rate",
            "reader_busy", "read_rate")}
    rates = [r["decode_tokens_per_s"] for r in runs]
    return (f"| {budget} | {name} | {med['decode_tokens_per_s']:.2f} | {min(rates):.2f}-{max(rates):.2f} | "
            f"{100 * med['stall_fraction']:.0f}% | {100 * med['reader_busy']:.0f}% at "
            f"{med['read_rate'] / 1e9:.2f} GB/s | {med['bytes_read_per_token'] / 1e6:.1f} MB | "
            f"{med['mean_bits']:.2f} | {100 * med['hit_rate']:.0f}% | "
            f"{_fmt_gb(max(r['peak_rss'] for r in runs))} / {_fmt_gb(max(r['maxrss_kernel'] for r in runs))} |")


def disk_read_rate(model: str, reads: int = 200) -> float:
    """Bytes/s of the reads a cache miss makes (levels 1..3 of an expert: its 4 bits) at random experts,
    page cache bypassed as in the runs (into a page-aligned buffer, as the cache's units are)."""
    import numpy as np

    from edge_moe.format.container import Container
    from edge_moe.runtime.arena import HostArena

    with Container(model, drop_page_cache=True) as c:
        layers, experts = c.manifest["experts"]["layers"], len(c.manifest["experts"]["offsets"][0])
        buf, rng, total = HostArena(1, c.expert_nbytes(3)).data[0], np.random.default_rng(0), 0
        t0 = time.perf_counter()
        for _ in range(reads):
            layer, expert = int(rng.choice(layers)), int(rng.integers(experts))
            total += c.read_expert(layer, expert, 3, buf, verify=False).nbytes
        return total / (time.perf_counter() - t0)


def _spec(args, budget: str, streaming: str, knobs, preload: bool) -> dict:
    """One child run's settings; "dynamic" knobs are (a)'s quality and bit range."""
    knobs = {"quality": args.quality, "min_bits": args.min_bits, "max_bits": args.max_bits} \
        if knobs == "dynamic" else knobs
    return {"model": args.model, "budget": budget, "streaming": streaming, "backend": args.backend,
            "context": args.context, "drop": not args.page_cache, "knobs": knobs, "preload": preload,
            "prompt": args.prompt, "tokens": args.tokens, "warmup": args.warmup}


def speed_table(args) -> None:
    print(f"model {args.model}, {args.tokens} decode tokens after a {args.prompt}-token prompt and "
          f"{args.warmup} warm-up tokens; backend {args.backend}; page cache "
          f"{'allowed' if args.page_cache else 'bypassed (direct I/O)'}; median of {args.repeats} runs, "
          f"each in a fresh process; (a) = quality {args.quality}, bits {args.min_bits}..{args.max_bits}; "
          f"1-min load average {os.getloadavg()[0]:.2f} at the start\n")
    if not args.page_cache:
        print(f"disk: {disk_read_rate(args.model) / 1e9:.2f} GB/s for reads of whole 4-bit experts at random "
              "(one read each, page cache bypassed), measured now\n")
    print("| budget | policy | tokens/s | min-max | stall | reader busy | read/token | mean bits | hits "
          "| peak RSS (sampled / kernel) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    policies = [(name, streaming, knobs, False) for name, (streaming, knobs) in POLICIES.items()
                if _label(name) in args.policies]
    for i, budget in enumerate(args.budgets):
        last = i == len(args.budgets) - 1
        resident = [(RESIDENT, "hebf", {"bits": 4}, True)] if last and args.resident else []
        specs = {name: _spec(args, budget, streaming, knobs, preload)
                 for name, streaming, knobs, preload in policies + resident}
        runs = {name: [] for name in specs}
        for _ in range(args.repeats):  # policies take turns, so that the machine's drift hits each alike
            for name, spec in specs.items():
                runs[name].append(run_child(spec))
        for name in specs:
            print(row(budget, name, runs[name]), flush=True)
    print(f"\n1-min load average {os.getloadavg()[0]:.2f} at the end")


def perplexity(model, ids, window: int, **knobs) -> tuple[float, float]:
    import numpy as np
    import torch

    total, count, bits = 0.0, 0, []
    for i in range(0, len(ids) - 1, window):
        w = ids[i:i + window + 1]
        logits = torch.from_numpy(np.asarray(model.logits(w[:-1], wait=True, **knobs)))
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        count += len(w) - 1
        bits.append(model.stats["mean_bits"])
    return math.exp(total / count), sum(bits) / len(bits)


def quality_table(args) -> None:
    from pathlib import Path

    import edge_moe
    from edge_moe.convert import convert

    source = Path(args.quality_model)
    text = Path(args.quality_text) if args.quality_text else source / "heldout.txt"
    with tempfile.TemporaryDirectory() as tmp:
        m = edge_moe.load(source if source.suffix == ".emoe"
                          else convert(source, Path(tmp) / "q.emoe", progress=False))
        ids = m.encode(text.read_text())[: args.quality_tokens]
        print(f"\nquality on the demo model's held-out text ({len(ids)} tokens, window 256)\n")
        print("| setting | mean bits | perplexity |")
        print("|---|---|---|")
        settings = [("fixed 8 bits", {"bits": 8}), ("fixed 4 bits (b, c)", {"bits": 4}),
                    ("fixed 3 bits", {"bits": 3})]
        asked = (args.quality, args.min_bits, args.max_bits)
        for q, lo, hi in dict.fromkeys([asked, (0.5, 3, 5), (0.7, 3, 6)]):  # the (a) run's first, once
            mark = " (a)" if (q, lo, hi) == asked else ""
            settings.append((f"dynamic: quality {q}, bits {lo}..{hi}{mark}",
                             {"quality": q, "min_bits": lo, "max_bits": hi}))
        for name, knobs in settings:
            ppl, bits = perplexity(m, ids, 256, **knobs)
            print(f"| {name} | {bits:.2f} | {ppl:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--budgets", nargs="+", default=["2GB", "3GB", "16GB"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--quality", type=float, default=0.5)
    ap.add_argument("--min-bits", type=int, default=2)
    ap.add_argument("--max-bits", type=int, default=6)
    ap.add_argument("--page-cache", action="store_true", help="let the OS cache the model file")
    ap.add_argument("--quality-model", default=None,
                    help="the demo model: its HF dir (with heldout.txt) or an .emoe (with --quality-text)")
    ap.add_argument("--quality-text", default=None,
                    help="held-out text (default: the HF dir's heldout.txt; see train_demo_model.py corpus)")
    ap.add_argument("--quality-tokens", type=int, default=8192)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--policies", nargs="+", default=[_label(n) for n in POLICIES],
                    choices=[_label(n) for n in POLICIES], help="rows to run: a a' b c")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs per row (median)")
    ap.add_argument("--resident", action="store_true",
                    help="add a row with every expert preloaded under the last budget (must hold them all)")
    args = ap.parse_args()
    if not args.skip_speed:
        speed_table(args)
    if args.quality_model:
        quality_table(args)


if __name__ == "__main__":
    main()
