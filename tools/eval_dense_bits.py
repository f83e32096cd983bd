"""Perplexity of an .emoe model by dense bit width (--dense-bits) and expert bit width, run by edge-moe.

    python tools/eval_dense_bits.py MODEL.emoe --text heldout.txt [--tokens 16384] [--window 256]
        [--dense-bits 16 8 6 4] [--bits 8 4]

Every row is the runtime's own forward on the same windows of held-out text; 16 is the file's bf16
dense part. Also counts greedy-decode agreement with the dense-16 row (64 tokens from 4 prompts).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import edge_moe
from tools.eval_quality import nll, windows


def perplexity(model, wins, bits: int) -> float:
    total = sum(nll(model.logits(w[:-1], bits=bits), w[1:]) for w in wins)
    return math.exp(total / sum(len(w) - 1 for w in wins))


def greedy(model, prompts, bits: int) -> list[list[int]]:
    return [list(model.generate_ids(p, max_tokens=16, bits=bits)) for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--dense-bits", type=int, nargs="+", default=[16, 8, 6, 4])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    args = ap.parse_args()
    text = Path(args.text).read_text(errors="replace")
    base, rows = {}, []
    for dense in args.dense_bits:
        with edge_moe.load(args.model, dense_bits=dense, max_context=args.window + 1) as m:
            ids = m.encode(text)
            wins = windows(ids, args.window, args.tokens)
            prompts = [ids[i * 997:i * 997 + 16] for i in range(4)]
            for bits in args.bits:
                t0 = time.perf_counter()
                ppl, toks = perplexity(m, wins, bits), greedy(m, prompts, bits)
                base.setdefault(bits, (ppl, toks))
                pairs = zip(toks, base[bits][1], strict=True)
                same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
                rows.append(f"| {dense} | {bits} | {ppl:.3f} | {100 * (ppl / base[bits][0] - 1):+.2f}% | "
                            f"{same}/{sum(map(len, toks))} | {time.perf_counter() - t0:.0f} s |")
                print(rows[-1], flush=True)
    print(f"\nheld-out tokens: {sum(len(w) - 1 for w in wins)}, window {args.window}\n")
    print("| dense bits | expert bits | perplexity | vs dense 16 | greedy tokens equal to dense 16 | time |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
