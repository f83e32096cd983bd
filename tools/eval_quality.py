"""Perplexity by expert bit width: bf16 vs both nested schemes vs independent round-to-nearest.

    python tools/eval_quality.py HF_DIR [--text heldout.txt] [--tokens 32768] [--window 256]

bf16 and RTN rows run transformers' forward (RTN: experts replaced by independently quantized
b-bit weights, dense part untouched, as in the nested rows); msb and mwq rows run edge-moe on the
converted file. Both forwards agree to ~1e-7 on equal weights (tests/model), so the rows compare
quantization only. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edge_moe
from edge_moe.convert import convert
from edge_moe.format.nested import quantize_rtn

BITS = (8, 7, 6, 5, 4, 3, 2)


def windows(ids: list[int], window: int, limit: int) -> list[list[int]]:
    ids = ids[: limit + 1]
    return [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window + 1]) > 1]


def nll(logits: np.ndarray, targets: list[int]) -> float:
    x = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return float(torch.nn.functional.cross_entropy(x, torch.tensor(targets), reduction="sum"))


def ppl_edge(model, wins, bits: int) -> float:
    total = sum(nll(model.logits(w[:-1], bits=bits), w[1:]) for w in wins)
    return math.exp(total / sum(len(w) - 1 for w in wins))


@torch.no_grad()
def ppl_hf(hf, wins) -> float:
    total = sum(nll(hf(torch.tensor([w[:-1]])).logits[0].float().numpy(), w[1:]) for w in wins)
    return math.exp(total / sum(len(w) - 1 for w in wins))


def expert_params(hf):
    """Every expert weight tensor: transformers v5 holds them as fused 3-D parameters."""
    out = []
    for mod in hf.modules():
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(mod, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.ndim == 3:
                out.append(p)
    return out


def rtn_rows(hf_dir: Path, wins, group: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    original = [p.data.clone() for p in expert_params(hf)]
    rows = {16: ppl_hf(hf, wins)}
    for bits in BITS:
        for p, w in zip(expert_params(hf), original, strict=True):
            p.data = torch.stack([torch.from_numpy(quantize_rtn(m.numpy(), bits, group)) for m in w])
        rows[bits] = ppl_hf(hf, wins)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--text", type=Path, default=None, help="held-out text (default HF_DIR/heldout.txt)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    text = (args.text or args.hf_dir / "heldout.txt").read_text()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        models = {s: edge_moe.load(convert(args.hf_dir, Path(tmp) / f"{s}.emoe", scheme=s,
                                           group=args.group, progress=False)) for s in ("msb", "mwq")}
        ids = models["msb"].encode(text)
        wins = windows(ids, args.window, args.tokens)
        rows["rtn"] = rtn_rows(args.hf_dir, wins, args.group)
        for s, m in models.items():
            rows[s] = {b: ppl_edge(m, wins, b) for b in BITS}
    print_table(rows, sum(len(w) - 1 for w in wins), time.time() - t0, args)


def print_table(rows, n_tokens, seconds, args) -> None:
    base = rows["rtn"][16]
    print(f"held-out tokens: {n_tokens}, window {args.window}, group {args.group}, "
          f"bf16 perplexity {base:.3f} ({seconds:.0f} s)\n")
    print("| bits | RTN (independent) | msb (nested) | mwq (nested) |")
    print("|---|---|---|---|")
    for b in BITS:
        cells = [f"{rows[k][b]:.3f} ({100 * (rows[k][b] / base - 1):+.1f}%)" for k in ("rtn", "msb", "mwq")]
        print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
