"""End-to-end decode tokens/s of one model on each device and bit width, side by side.

    python tools/bench_decode.py MODEL.emoe --devices cpu cuda --bits 8 4 2 [--tokens 32]
        [--memory-budget 3GB] [--gpu-memory-budget 2GB] [--backend NAME]

Each row: a random 16-token prompt, a warm-up generation that fills the expert cache, then the
median decode rate of --repeats timed generations (greedy, fixed bits). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import edge_moe


def measure(model, bits: int, tokens: int, repeats: int) -> dict:
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, size=16).tolist()
    list(model.generate_ids(prompt, max_tokens=4, bits=bits))
    rates, stats = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        list(model.generate_ids(prompt, max_tokens=tokens, bits=bits))
        rates.append(model.stats["decode_tokens_per_s"])
        stats = dict(model.stats, wall_s=time.perf_counter() - t0)
    return {"tokens_per_s": statistics.median(rates), **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4, 2])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--gpu-memory-budget", default=None)
    args = ap.parse_args()
    print(f"model {args.model}, {args.tokens} greedy decode tokens, median of {args.repeats}\n")
    print("| device | backend | bits | tokens/s | stall | expert compute s | hit rate | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for device in args.devices:
        with edge_moe.load(args.model, device=device, backend=args.backend, memory_budget=args.memory_budget,
                           gpu_memory_budget=args.gpu_memory_budget if device == "cuda" else None) as m:
            backend = m.pipeline.backend.__name__.rsplit(".", 1)[-1]  # backends are modules
            for bits in args.bits:
                r = measure(m, bits, args.tokens, args.repeats)
                print(f"| {device} | {backend} | {bits} | {r['tokens_per_s']:.2f} | "
                      f"{100 * r['stall_fraction']:.0f}% | {r['expert_compute_s']:.3f} | "
                      f"{100 * r['hit_rate']:.0f}% | {r['peak_rss'] / 1e9:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
