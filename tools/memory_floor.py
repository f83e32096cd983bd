"""The README's model table: dense bytes, KV cache and the smallest --memory-budget the memory plan
accepts for each model of tools/make_synthetic_checkpoint.py, from its config alone.

    python tools/memory_floor.py [--baseline 140MB] [--dense-bits 8] [--max-context 2048]

--baseline is the process's RSS before weights (`edge-moe run ... --memory-budget 6GB` prints it as
"process baseline" in its memory plan).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_synthetic_checkpoint import MODELS  # noqa: E402

from edge_moe.config import format_size, parse_size  # noqa: E402
from edge_moe.errors import BudgetError  # noqa: E402
from edge_moe.format.layout import build_layout  # noqa: E402
from edge_moe.model.adapters import get_adapter  # noqa: E402
from edge_moe.model.host_layers import kv_bytes  # noqa: E402
from edge_moe.model.load import held_nbytes  # noqa: E402
from edge_moe.model.weights import dense_shapes, expert_shapes  # noqa: E402
from edge_moe.runtime.memory import plan_memory  # noqa: E402

PREFILL_CHUNK = 32


def floor(cfg, dense: int, kv: int, unit_bytes: int, max_context: int, baseline: int) -> int:
    """The smallest budget plan_memory accepts (to 1 MB), by bisection (the margin grows with it)."""
    lo, hi = 10**6, 10**12
    while hi - lo > 10**6:
        mid = (lo + hi) // 2
        try:
            plan_memory(mid, cfg, dense, kv, unit_bytes, PREFILL_CHUNK, max_context, baseline)
            hi = mid
        except BudgetError:
            lo = mid
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="140MB")
    ap.add_argument("--dense-bits", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=2048)
    args = ap.parse_args()
    print("| model | dense part | KV cache | experts at 4 bits | --memory-budget refused below |")
    print("|---|---|---|---|---|")
    for name, hf in MODELS.items():
        cfg = get_adapter(hf["model_type"]).config(hf)
        layout = build_layout(expert_shapes(cfg), "msb", 128)
        dense, kv = held_nbytes(dense_shapes(cfg), 4, args.dense_bits), kv_bytes(cfg, args.max_context)
        experts = len(cfg.moe_layers) * cfg.num_experts * layout.bytes_for_bits(4)
        need = floor(cfg, dense, kv, layout.unit_bytes, args.max_context, parse_size(args.baseline))
        print(f"| {name} | " + " | ".join(format_size(n) for n in (dense, kv, experts, need)) + " |")


if __name__ == "__main__":
    main()
