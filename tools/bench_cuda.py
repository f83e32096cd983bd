"""Benchmark the CUDA bit-plane kernels: time, GB/s of weight bytes vs measured copy bandwidth, and
the ratio to torch fp16 matmul on the same shapes, side by side in one run. Prints markdown tables.

    PYTHONPATH=. python3 tools/bench_cuda.py [--tokens 1 16] [--bits 2 4 8] [--out bench.md]
        [--baseline DIR] [--no-pdl] [--plan KW,NW,STAGES] [--only Mixtral OLMoE]

Times are medians of CUDA-graph replays (each replay runs every buffer of a rotation once), so
they hold GPU time, not Python launch overhead; the rotation covers at least --rotate-mb of weights
so that repeated calls read DRAM, not L2. Matrix rows time the automatic kernel choice ("ours":
gemv_kernel for T <= 2) and, for T <= 2, the fp16-mma kernel forced ("mma16"), side by side. The
layer table times moe_ffn_units on experts scattered over arena units (the runtime's call) and
moe_ffn on a slab, against torch fp16 as a per-expert loop and, for one token, as two batched
matmuls over the stacked experts ("grouped"); its "eager" column is wall time per call without
graphs (Python included). "copy of its bytes" is a device copy of a matrix's bytes in the same
graph setting: one kernel's floor at that size (small decode matrices are latency-bound on a big GPU).
--baseline DIR builds the native sources in DIR (e.g. an older commit's native/) as a second
extension and times its automatic kernel choice on the same buffers in the same run ("base" columns).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from edge_moe.format.layout import build_layout
from edge_moe.format.nested import MAX_BITS
from edge_moe.kernels import cuda

MATRICES = [  # (name, O, N): decode shapes of real MoE experts
    ("OLMoE gate_up", 2048, 2048), ("OLMoE down", 2048, 1024),
    ("Qwen3-30B-A3B gate_up", 1536, 2048), ("Qwen3-30B-A3B down", 2048, 768),
    ("Mixtral gate", 14336, 4096), ("Mixtral down", 4096, 14336),
    ("GPT-OSS 2880", 2880, 2880),
]
LAYERS = [("OLMoE", 2048, 1024, 64, 8), ("Qwen3-30B-A3B", 2048, 768, 128, 8),  # (name, D, I, experts, top-k)
          ("Mixtral", 4096, 14336, 8, 2), ("GPT-OSS-20B", 2880, 2880, 32, 4)]
GROUP = 128


def graph_time(calls: list, replays: int = 15) -> float:
    """Median microseconds per call of `calls` (closures), captured once in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def eager_time(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time([lambda: dst.copy_(src)] * 5, replays=10)
    return 2 * nbytes / us / 1e3


def random_slab(layout, slots: int, bits: int) -> torch.Tensor:
    """[slots, prefix] uint8: random planes with sane fp16 scale / minimum / alpha sections."""
    nbytes = layout.bytes_for_bits(bits)
    slab = torch.randint(0, 256, (slots, nbytes), dtype=torch.uint8, device="cuda")
    for s in layout.sections:
        if s.kind != "planes" and s.offset + s.nbytes <= nbytes:
            value = {"scale": 1e-3, "minimum": -0.1, "alpha": 2e-4}[s.kind]
            fill = torch.full((s.nbytes // 2,), value, dtype=torch.float16, device="cuda")
            slab[:, s.offset:s.offset + s.nbytes] = fill.view(torch.uint8)
    return slab


def random_arena(layout, entries: int, bits: int, seed: int = 0):
    """(arena [U, unit_bytes], units [entries, 8]): each entry's chunks 0..bits-1 in scattered units."""
    n = entries * bits
    arena = torch.randint(0, 256, (n, layout.unit_bytes), dtype=torch.uint8, device="cuda")  # row e * bits + c
    for s in layout.sections:
        if s.kind != "planes" and s.chunk < bits:
            value = {"scale": 1e-3, "minimum": -0.1, "alpha": 2e-4}[s.kind]
            at = s.offset - layout.chunk_starts[s.chunk]
            fill = torch.full((s.nbytes // 2,), value, dtype=torch.float16, device="cuda").view(torch.uint8)
            arena[s.chunk::bits, at:at + s.nbytes] = fill
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()  # row r -> row perm[r]
    units = np.full((entries, MAX_BITS), -1, dtype=np.int64)
    units[:, :bits] = perm.reshape(entries, bits)
    return arena[torch.from_numpy(np.argsort(perm)).cuda()].contiguous(), units


def rotation(nbytes: int, mb: int) -> int:
    return max(2, min(512, -(-mb * (1 << 20) // max(nbytes, 1))))


_baseline = {}


def baseline_ext(path: str | None):
    """The extension built from the native sources in `path` (None: no baseline)."""
    if not path:
        return None
    if path not in _baseline:
        import zlib

        from torch.utils.cpp_extension import load
        major, minor = torch.cuda.get_device_capability()
        tag = zlib.crc32(os.path.abspath(path).encode())
        name = f"edge_moe_baseline_{tag:08x}_sm{major}{minor}"
        build = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp"), name)
        os.makedirs(build, exist_ok=True)
        _baseline[path] = load(name=name,
                               sources=[os.path.join(path, s) for s in cuda.SOURCES], build_directory=build,
                               extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)
    return _baseline[path]


def bench_matrix(name, o, n, scheme, bits, t, args, torch_us: dict) -> dict:
    layout = build_layout({"w": (o, n)}, scheme, GROUP)
    nbytes = layout.bytes_for_bits(bits)
    slots = rotation(nbytes, args.rotate_mb)
    slab = random_slab(layout, slots, bits)
    x = torch.randn(t, n, device="cuda", dtype=torch.float16)
    out = torch.empty(t, o, device="cuda")
    def timed(kernel):
        return graph_time([lambda i=i: cuda.nested_matmul(layout, slab[i], "w", x, bits, out=out,
                                                          blocks_per_sm=args.bps, kernel=kernel)
                           for i in range(slots)])
    us = timed(cuda.KERNEL_AUTO)
    mma16 = timed(cuda.KERNEL_MMA16) if t <= 2 else float("nan")
    desc = cuda.matrix_desc(layout, "w")
    job = [bits, 0, t, *layout.chunk_starts]
    base = baseline_ext(args.baseline)
    base_us = float("nan")
    if base is not None:
        base_us = graph_time([lambda i=i: base.gemm(slab[i], desc, job, x, None, False, out, None, None, False,
                                                    args.bps, cuda.KERNEL_AUTO) for i in range(slots)])
    k, st, kw, ks, kr, gx, gy, gz, _, nw = cuda.native().gemm(slab[0], desc, job, x, None, False, out, None,
                                                              None, False, args.bps, cuda.KERNEL_AUTO)
    src = torch.randint(0, 255, (slots, nbytes), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src[0])
    copy_us = graph_time([lambda i=i: dst.copy_(src[i]) for i in range(slots)])  # one kernel on these bytes
    if (o, n, t) not in torch_us:
        w = torch.randn(rotation(2 * o * n, args.rotate_mb), o, n, device="cuda", dtype=torch.float16)
        torch_us[(o, n, t)] = graph_time([lambda i=i: F.linear(x, w[i]) for i in range(w.shape[0])])
    plan = (f"gemv w{nw} kw{kw} s{st} k{ks}x{kr} grid {gx}" if k == 1
            else f"mma16 k{ks}x{kr} grid {gx}x{gy}x{gz}")
    return {"us": us, "mma16": mma16, "base": base_us, "gbs": nbytes / us / 1e3, "torch": torch_us[(o, n, t)],
            "plan": plan, "copy": copy_us}


def matrix_table(args, bw: float) -> list[str]:
    rows = ["| matrix | O x N | scheme | bits | T | ours us | GB/s | % copy BW | copy of its bytes us "
            "| torch fp16 us | speed-up | base us | base speed-up | mma16 us | plan |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    torch_us: dict = {}
    for name, o, n in MATRICES:
        if args.only and not any(w.lower() in name.lower() for w in args.only):
            continue
        for scheme in args.schemes:
            for t in args.tokens:
                for bits in args.bits:
                    r = bench_matrix(name, o, n, scheme, bits, t, args, torch_us)
                    rows.append(f"| {name} | {o}x{n} | {scheme} | {bits} | {t} | {r['us']:.1f} "
                                f"| {r['gbs']:.0f} | {100 * r['gbs'] / bw:.0f}% | {r['copy']:.1f} "
                                f"| {r['torch']:.1f} "
                                f"| {r['torch'] / r['us']:.2f}x | {r['base']:.1f} "
                                f"| {r['torch'] / r['base']:.2f}x | {r['mma16']:.1f} | {r['plan']} |")
                    print(rows[-1], flush=True)
    return rows


def layer_case(experts, t, bits_list, k, seed=0):
    """Routing of t tokens to top-k of `experts`: (active, bits, ptr, tokens, weights) by expert."""
    rng = np.random.default_rng(seed)
    chosen = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(t)])
    active = sorted(set(chosen.ravel().tolist()))
    ptr, tokens, weights, bits = [0], [], [], []
    for j, e in enumerate(active):
        rows = np.nonzero((chosen == e).any(1))[0]
        tokens += rows.tolist()
        weights += rng.random(len(rows)).tolist()
        ptr.append(len(tokens))
        bits.append(bits_list[j % len(bits_list)])
    return active, bits, ptr, tokens, weights


def bench_layer(name, d, i, experts, k, t, bits_list, scheme, args, bw: float) -> str:
    layout = build_layout({"gate_up": (2 * i, d), "down": (d, i)}, scheme, GROUP)
    active, bits, ptr, tokens, weights = layer_case(experts, t, bits_list, k)
    per_set = sum(layout.bytes_for_bits(b) for b in bits)
    sets = rotation(per_set, args.rotate_mb)
    x = torch.randn(t, d, device="cuda", dtype=torch.float16)
    tok = torch.tensor(tokens, dtype=torch.int32, device="cuda")
    wts = torch.tensor(weights, dtype=torch.float32, device="cuda")
    arena, units = random_arena(layout, sets * len(active), max(bits))
    units = units.reshape(sets, len(active), MAX_BITS)

    def units_call(s, kernel=cuda.KERNEL_AUTO):
        return cuda.moe_ffn_units(layout, arena, units[s], bits, x, ptr, tok, wts, blocks_per_sm=args.bps,
                                  kernel=kernel)
    ours = graph_time([lambda s=s: units_call(s) for s in range(sets)])
    base = baseline_ext(args.baseline)
    base_us = float("nan")
    if base is not None:  # the same moe_ffn_units calls through the baseline extension
        native = cuda._state["ext"]
        cuda._state["ext"] = base
        try:
            base_us = graph_time([lambda s=s: units_call(s) for s in range(sets)])
        finally:
            cuda._state["ext"] = native
    mma16 = graph_time([lambda s=s: units_call(s, cuda.KERNEL_MMA16) for s in range(sets)])
    eager = eager_time(lambda: units_call(0))
    slab = random_slab(layout, sets * len(active), max(bits))
    slots = [[s * len(active) + j for j in range(len(active))] for s in range(sets)]
    on_slab = graph_time([lambda s=s: cuda.moe_ffn(layout, slab, slots[s], bits, x, ptr, tok, wts,
                                                   blocks_per_sm=args.bps) for s in range(sets)])
    rows = [tok[ptr[j]:ptr[j + 1]].long() for j in range(len(active))]
    fp16_set = len(active) * 3 * i * d * 2
    tsets = rotation(fp16_set, args.rotate_mb)
    gu = torch.randn(tsets, len(active), 2 * i, d, device="cuda", dtype=torch.float16) * 0.02
    dn = torch.randn(tsets, len(active), d, i, device="cuda", dtype=torch.float16) * 0.02

    def torch_layer(s):
        out = torch.zeros(t, d, device="cuda", dtype=torch.float16)
        for j in range(len(active)):
            g, u = F.linear(x[rows[j]], gu[s, j]).chunk(2, dim=-1)
            out.index_add_(0, rows[j], F.linear(F.silu(g) * u, dn[s, j]) * wts[ptr[j]:ptr[j + 1], None].half())
        return out
    def torch_grouped(s):  # one token: every active expert's fp16 weights in two batched matmuls
        h = torch.bmm(gu[s], x[0].expand(len(active), d)[:, :, None])  # [E, 2I, 1]
        g, u = h.chunk(2, dim=1)
        y = torch.bmm(dn[s], F.silu(g) * u)[:, :, 0]  # [E, D]
        return (y * wts[:, None].half()).sum(0)
    ref = graph_time([lambda s=s: torch_layer(s) for s in range(tsets)])
    grouped = graph_time([lambda s=s: torch_grouped(s) for s in range(tsets)]) if t == 1 else float("nan")
    mix = "/".join(str(b) for b in bits_list)
    return (f"| {name} | {scheme} | {t} | {len(active)} | {mix} | {ours:.1f} | {per_set / ours / 1e3:.0f} "
            f"| {100 * per_set / ours / 1e3 / bw:.0f}% | {on_slab:.1f} | {mma16:.1f} | {base_us:.1f} "
            f"| {ref:.1f} | {ref / ours:.2f}x | {grouped:.1f} | {grouped / ours:.2f}x | {eager:.0f} |")


def layer_table(args, bw: float) -> list[str]:
    rows = ["| layer | scheme | T | experts | bits | moe_ffn_units us | GB/s | % copy BW | moe_ffn (slab) us "
            "| mma16 units us | base units us | torch fp16 loop us | speed-up | torch fp16 grouped us "
            "| speed-up | eager us |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d, i, experts, k in LAYERS:
        if args.only and not any(w.lower() in name.lower() for w in args.only):
            continue
        for scheme in args.schemes:
            for t, mix in ((1, [4]), (1, [8, 8, 6, 6, 4, 4, 3, 2]), (16, [4])):
                if t not in args.layer_tokens:
                    continue
                rows.append(bench_layer(name, d, i, experts, k, t, mix, scheme, args, bw))
                print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--layer-tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--schemes", nargs="+", default=["msb", "mwq"])
    ap.add_argument("--bps", type=int, default=cuda.BLOCKS_PER_SM, help="k split: 0 auto, n: n blocks per SM")
    ap.add_argument("--rotate-mb", type=int, default=256, help="weights cycled through per timing (> L2)")
    ap.add_argument("--skip-matrices", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    ap.add_argument("--baseline", help="native/ sources of a baseline build, timed in the same run")
    ap.add_argument("--no-pdl", action="store_true", help="gemv_kernel without programmatic dependent launch")
    ap.add_argument("--plan", help="force gemv_kernel's KW,NW,STAGES (0: the planner's)")
    ap.add_argument("--only", nargs="+", help="matrices / layers whose name contains one of these")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or cuda.native() is None:
        print(f"no native CUDA kernels: {cuda.native_error() or 'no GPU'}", file=sys.stderr)
        return 1
    kw, nw, st = (int(v) for v in (args.plan or "0,0,0").split(","))
    cuda.native().set_gemv_options(not args.no_pdl, kw, nw, st)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    head = [f"GPU: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
            f"measured copy bandwidth {bw:.0f} GB/s (read + write); group {GROUP}; x fp16; "
            f"k split {'auto' if args.bps <= 0 else f'{args.bps} blocks/SM'}; "
            f"gemv PDL {'off' if args.no_pdl else 'on'}, plan {args.plan or 'auto'}; "
            f"baseline {args.baseline or 'none'}; "
            "plan: kernel, warps per block, k warps, ring stages, k parts x inputs per part, grid", ""]
    print("\n".join(head), flush=True)
    lines = head + ([] if args.skip_matrices else matrix_table(args, bw) + [""])
    lines += [] if args.skip_layers else layer_table(args, bw)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
