"""Decode and prefill tokens/s of llama.cpp (Q8_0, Q4_0, Q4_K_M) and edge-moe (experts 2-8 bits), one model.

    python tools/bench_vs_llamacpp.py --work DIR [--llama-cpp LLAMA_CPP_DIR] [--layers 4]
        [--tokens 64] [--prefill 64] [--repeats 5] [--depth 0] [--threads 2]
        [--configs 8:8 4:8 3:8 2:8 4:4 4:16]
        [--llama-bench PATH] [--llama-quantize PATH] [--convert-script PATH]

One run: writes (or reuses, under --work) an OLMoE-1B-7B-shaped checkpoint with random weights and
--layers layers (tools/make_synthetic_checkpoint.py), converts it to .emoe (msb) and to GGUF (bf16,
then llama-quantize), times decode on both, and prints one markdown table plus the ratio
edge-moe 4-bit experts / llama.cpp Q4_0. An edge-moe config EXPERT:DENSE gives the expert bits and
--dense-bits (embedding, attention, LM head; 16 = bf16). llama.cpp's Q4_0 holds experts and
attention at 4.5 bits and the LM head at Q6_K, so 4:4 is the like-for-like row and 4:8 the default.
Both sides: --threads threads, every weight in RAM, --tokens
single-token forward passes per repeat after a --depth-token context (llama-bench -d; the edge-moe
prompt, at least 1 token) that is not timed, median of --repeats; and prefill: one --prefill-token
prompt (llama-bench pp; edge-moe's prefill in chunks of its prefill_chunk), median of --repeats.
--depth is 0 by default because this llama.cpp build segfaults in prompt processing
(ggml_backend_amx_mul_mat, batch > 1) on AMX-capable CPUs (pass --prefill 0 there); decode is
unaffected. The llama.cpp rows are skipped, with a message, when
llama-bench, llama-quantize or convert_hf_to_gguf.py is not found.

llama.cpp build used (llama-cpp-python 0.3.36 sdist, vendored llama.cpp 0c1e570; gcc 12.2, cmake 3.25):
    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-0.3.36.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 \\
        pip install ./llama_cpp_python-0.3.36.tar.gz            # the Python bindings (not used here)
    L=llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $L -B $L/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    nice -n 19 cmake --build $L/build -j 2 --target llama-bench llama-quantize
    python tools/bench_vs_llamacpp.py --work DIR --llama-cpp $L   # finds build/bin/llama-*, the converter
convert_hf_to_gguf.py only takes a tokenizer whose pre-tokenizer hash it knows, and the synthetic
checkpoint's is not one; so the GGUF is made from a copy of the checkpoint (weights symlinked) carrying
GPT-2's BPE tokenizer, rebuilt from the vendored models/ggml-vocab-gpt-2.gguf (50257 tokens; the
converter pads to the config's 50304). The tokenizer does not change decode speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_K_M"]
EDGE_CONFIGS = ["8:8", "4:8", "3:8", "2:8", "4:4", "4:16"]  # expert bits : dense bits
REPO = Path(__file__).resolve().parent.parent


def run_logged(cmd: list, log: Path, cwd=None) -> None:
    """Run a preparation step niced, output to `log`; exit with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    with open(log, "w") as f:
        rc = subprocess.run(["nice", "-n", "19", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def find_tool(given: str | None, name: str, llama_cpp: Path | None) -> Path | None:
    """An explicit path, else LLAMA_CPP_DIR/build/bin/NAME, else NAME on $PATH."""
    if given:
        return Path(given)
    if llama_cpp and (llama_cpp / "build" / "bin" / name).exists():
        return llama_cpp / "build" / "bin" / name
    found = shutil.which(name)
    return Path(found) if found else None


def synthetic_checkpoint(work: Path, layers: int) -> Path:
    ckpt = work / f"olmoe-{layers}l"
    if not (ckpt / "config.json").exists():
        run_logged([sys.executable, REPO / "tools/make_synthetic_checkpoint.py", "--like", "olmoe-1b-7b",
                    "--layers", layers, "--force", ckpt], work / f"logs/{ckpt.name}-checkpoint.log")
    return ckpt


def edge_moe_file(ckpt: Path) -> Path:
    out = ckpt.with_suffix(".emoe")
    if not out.exists():
        run_logged([sys.executable, "-m", "edge_moe.cli", "convert", "--quiet", ckpt, out],
                   ckpt.parent / f"logs/{ckpt.name}-emoe-convert.log", cwd=REPO)
    return out


def write_gpt2_tokenizer(tree: Path, dst: Path) -> None:
    """GPT-2's byte-level BPE (a tokenizer convert_hf_to_gguf.py recognises) as tokenizer.json."""
    sys.path.insert(0, str(tree / "gguf-py"))
    import gguf

    fields = gguf.GGUFReader(tree / "models/ggml-vocab-gpt-2.gguf").fields
    tokens, merges = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.merges"].contents()
    eos = len(tokens) - 1  # <|endoftext|>
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
             "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    special = {"id": eos, "content": tokens[eos], "single_word": False, "lstrip": False, "rstrip": False,
               "normalized": False, "special": True}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [special], "normalizer": None,
           "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level, "model": model}
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokens[eos], "eos_token": tokens[eos]}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))


def gguf_files(ckpt: Path, convert: Path, quantize: Path) -> dict[str, Path]:
    """{type: path}: each of GGUF_TYPES by llama-quantize from a bf16 GGUF of the checkpoint."""
    work, logs = ckpt.parent, ckpt.parent / "logs"
    out = {t: work / f"{ckpt.name}-{t}.gguf" for t in GGUF_TYPES}
    bf16 = work / f"{ckpt.name}-bf16.gguf"  # kept for re-runs; delete it to save disk
    if not all(p.exists() for p in out.values()) and not bf16.exists():
        copy = work / f"{ckpt.name}-gpt2tok"  # never touch the source checkpoint
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        for f in ckpt.iterdir():
            if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
                (copy / f.name).symlink_to(f.resolve())
        shutil.copy(ckpt / "config.json", copy)
        write_gpt2_tokenizer(convert.parent, copy)
        run_logged([sys.executable, convert, copy, "--outtype", "bf16", "--outfile", bf16],
                   logs / f"{ckpt.name}-gguf-convert.log")
    for t, path in out.items():
        if not path.exists():
            run_logged([quantize, bf16, path, t], logs / f"{ckpt.name}-quantize-{t}.log")
    return out


def llama_bench(bench: Path, files: dict[str, Path], args) -> tuple[dict, dict]:
    """({type: tokens/s of each repeat} of llama-bench tg (n_gen forward passes after n_depth context),
    the same of pp (one --prefill-token prompt; empty without --prefill))."""
    cmd = [bench, "-t", args.threads, "-p", args.prefill, "-n", args.tokens, "-r", args.repeats, "-o", "json"]
    if args.depth:
        cmd += ["-d", args.depth]
    for f in files.values():
        cmd += ["-m", f]
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"llama-bench failed ({res.returncode}): {res.stderr[-3000:]}")
    by_file = {str(f): t for t, f in files.items()}
    tg, pp = {}, {}
    for r in json.loads(res.stdout):
        (pp if r["n_gen"] == 0 else tg)[by_file[r["model_filename"]]] = r["samples_ts"]
    return tg, pp


def time_bits(m, prompt: list[int], bits: int, args) -> dict:
    """Rates ((new_tokens - 1) / decode_s: token 1 comes from the prefill), expert ms per decode
    token, and bytes read from the file while timed (0 when every weight is resident)."""
    list(m.generate_ids(prompt, max_tokens=args.tokens + 1, bits=bits))  # warm-up: every expert used once
    # (on AVX2 the first use at 3-4 bits rewrites an expert into the kernels' nibble form)
    list(m.generate_ids(prompt, max_tokens=1, bits=bits))  # prefill only: its expert time
    prefill_expert_s = m.stats["expert_compute_s"]
    rates, expert_ms, read = [], [], 0
    for _ in range(args.repeats):
        list(m.generate_ids(prompt, max_tokens=args.tokens + 1, bits=bits))
        s, n = m.stats, m.stats["new_tokens"] - 1
        rates.append(n / s["decode_s"])
        expert_ms.append(1e3 * (s["expert_compute_s"] - prefill_expert_s) / n)
        read += s["bytes_read"]
    long_prompt = np.random.default_rng(1).integers(0, m.config.vocab_size, size=args.prefill).tolist()
    prefill = []
    for _ in range(args.repeats if args.prefill else 0):
        list(m.generate_ids(long_prompt, max_tokens=1, bits=bits))
        prefill.append(args.prefill / m.stats["prefill_s"])
    return {"rates": rates, "prefill": prefill, "expert_ms": statistics.median(expert_ms), "bytes_read": read}


def edge_moe_bench(path: Path, args) -> tuple[dict[tuple[int, int], dict], str]:
    """{(expert bits, dense bits): timings and the resident dense bytes}, one load per row (the form
    resident experts are held in depends on the widths they ran at)."""
    import edge_moe

    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
    out, backend = {}, ""
    for bits, dense in configs:
        with edge_moe.load(path, backend="cpu", dense_bits=dense) as m:
            m.preload(8)  # no memory budget: the cache holds every level
            m.eos_ids = set()  # always decode --tokens tokens
            prompt = np.random.default_rng(0).integers(0, m.config.vocab_size, size=max(args.depth, 1)).tolist()
            backend = m.pipeline.backend.__name__
            dense_bytes = sum(t.nbytes for t in m.decoder.w.values())
            out[bits, dense] = {**time_bits(m, prompt, bits, args), "dense_bytes": dense_bytes}
    return out, backend


def row(engine: str, weights: str, gb: float, rates: list[float], ref: float | None, prefill: list[float],
        pref: float | None, note: str) -> str:
    med = statistics.median(rates)
    vs = f"{med / ref:.2f}x" if ref else "-"
    spread = f"{min(rates):.2f}-{max(rates):.2f}"
    pp = statistics.median(prefill) if prefill else None
    pp_cells = f"{pp:.1f} | {pp / pref:.2f}x" if pp and pref else f"{pp:.1f} | -" if pp else "- | -"
    return f"| {engine} | {weights} | {gb:.2f} | {med:.2f} | {spread} | {vs} | {pp_cells} | {note} |"


def print_header(args, ckpt: Path, backend: str, loads: list[float]) -> None:
    import numba
    import torch

    c = json.loads((ckpt / "config.json").read_text())
    print(f"model: {ckpt} (OLMoE-1B-7B shapes, random bf16 weights): {c['num_hidden_layers']} layers, "
          f"hidden {c['hidden_size']}, {c['num_experts']} experts x {c['intermediate_size']}, "
          f"top-{c['num_experts_per_tok']}, vocab {c['vocab_size']}")
    print(f"decode: {args.tokens} single-token forward passes after a {args.depth}-token context (edge-moe: "
          f"{max(args.depth, 1)}; not timed), median of {args.repeats}; llama-bench -t {args.threads}; "
          f"edge-moe {backend}, torch "
          f"threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}; 1-min load average "
          f"{loads[0]:.2f} before, {loads[-1]:.2f} after\n")


def print_table(ggufs: dict, llama: dict, llama_pp: dict, emoe: Path, edge: dict) -> None:
    from edge_moe.api import describe

    d = describe(emoe)
    ref = statistics.median(llama["Q4_0"]) if "Q4_0" in llama else None
    pref = statistics.median(llama_pp["Q4_0"]) if "Q4_0" in llama_pp else None
    print("| engine | weights | GB | decode tok/s | min-max | vs llama.cpp Q4_0 | prefill tok/s | vs Q4_0 "
          "| notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, rates in llama.items():
        print(row("llama.cpp", t, ggufs[t].stat().st_size / 1e9, rates, ref, llama_pp.get(t, []), pref,
                  "llama-bench tg and pp, random tokens"))
    for (bits, dense), r in edge.items():
        gb = (r["dense_bytes"] + d["expert_bytes_by_bits"][bits]) / 1e9
        note = (f"greedy; experts {r['expert_ms']:.1f} of {1e3 / statistics.median(r['rates']):.1f} ms/token; "
                f"{r['bytes_read']} B read from file while timed")
        dense_name = "bf16 dense" if dense == 16 else f"{dense}-bit dense"
        print(row("edge-moe", f"{bits}-bit experts, {dense_name}", gb, r["rates"], ref, r["prefill"], pref,
                  note))
    print("\nGB: the GGUF file; edge-moe: its resident dense part (embedding, attention, LM head, routers) "
          "plus "
          "the expert bit-planes used at that width (all 8 planes are resident).")
    for (bits, dense), r in edge.items():
        if ref and bits == 4:
            print(f"edge-moe 4-bit experts, dense {dense} / llama.cpp Q4_0 = "
                  f"{statistics.median(r['rates']) / ref:.2f}x (target >= 0.80x)")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="where the model files go (~15 GB at 4 layers)")
    ap.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                    help="llama.cpp source tree: convert_hf_to_gguf.py, gguf-py, models/, build/bin/")
    ap.add_argument("--llama-bench", help="default: LLAMA_CPP_DIR/build/bin/llama-bench, else $PATH")
    ap.add_argument("--llama-quantize", help="default: LLAMA_CPP_DIR/build/bin/llama-quantize, else $PATH")
    ap.add_argument("--convert-script", help="default: LLAMA_CPP_DIR/convert_hf_to_gguf.py")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--depth", type=int, default=0, help="context tokens before the timed decode")
    ap.add_argument("--prefill", type=int, default=64, help="prompt tokens of the timed prefill (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (edge-moe: its default)")
    ap.add_argument("--configs", nargs="+", default=EDGE_CONFIGS, help="edge-moe EXPERT_BITS:DENSE_BITS rows")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    ckpt = synthetic_checkpoint(args.work, args.layers)
    emoe = edge_moe_file(ckpt)
    tools = {"llama-bench": find_tool(args.llama_bench, "llama-bench", args.llama_cpp),
             "llama-quantize": find_tool(args.llama_quantize, "llama-quantize", args.llama_cpp),
             "convert_hf_to_gguf.py": Path(args.convert_script) if args.convert_script else
             args.llama_cpp / "convert_hf_to_gguf.py" if args.llama_cpp else None}
    missing = [name for name, p in tools.items() if p is None or not p.exists()]
    ggufs, llama, llama_pp = {}, {}, {}
    if missing:
        print(f"SKIPPING the llama.cpp rows: not found: {', '.join(missing)} (pass --llama-cpp or the paths)\n")
    else:
        ggufs = gguf_files(ckpt, tools["convert_hf_to_gguf.py"], tools["llama-quantize"])
    loads = [os.getloadavg()[0]]
    if ggufs:
        llama, llama_pp = llama_bench(tools["llama-bench"], ggufs, args)
    edge, backend = edge_moe_bench(emoe, args)
    loads.append(os.getloadavg()[0])
    print_header(args, ckpt, backend, loads)
    print_table(ggufs, llama, llama_pp, emoe, edge)


if __name__ == "__main__":
    main()
