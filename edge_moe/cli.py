"""Command line: parses arguments and calls the API (convert, run, inspect)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings

from edge_moe import __version__
from edge_moe.config import CPU_DENSE_BITS, DENSE_BITS, format_size
from edge_moe.errors import EdgeMoeError, UsageError


def _convert(args) -> None:
    from edge_moe.convert import convert

    out = convert(args.src, args.dst, scheme=args.scheme, group=args.group, force=args.force,
                  progress=not args.quiet)
    print(f"wrote {out}")


def _start_compile(options: dict) -> None:
    """On a first run, start the kernels' compile children first; this process reads the model file's
    header and tokenizer while they work (load() waits for them). Only for the cpu defaults it can
    name here."""
    from edge_moe.runtime.warm import groups_for, start

    bits = options["dense_bits"]
    if options["device"] == "cpu" and options["backend"] in (None, "cpu") and bits in (None, *DENSE_BITS):
        start(groups_for("cpu", bits or CPU_DENSE_BITS, True))


KNOBS = ("bits", "quality", "min_bits", "max_bits")
PROFILED = ("memory_budget", "gpu_memory_budget", "device", "dense_bits", "max_context", "threads", "streaming")
DEFAULTS = {"device": "cpu", "max_context": 2048, "max_batch": 4}


def _settings(args, serve: bool = False) -> tuple[dict, dict]:
    """(load() options, default request knobs): each flag given, else the --profile's value, else the
    built-in default. The profile's knobs apply only when no knob flag is given (they are one choice)."""
    profile = None
    if args.profile is not None:
        from edge_moe.runtime.profiles import load_profile

        profile = load_profile(args.profile)

    def pick(name: str):
        value = getattr(args, name)
        if value is None and profile is not None:
            value = getattr(profile, name)
        return DEFAULTS.get(name) if value is None else value

    options = {name: pick(name) for name in (*PROFILED, *(("max_batch",) if serve else ()))}
    options.update(backend=args.backend, drop_page_cache=args.drop_page_cache)
    knobs = {k: getattr(args, k, None) for k in KNOBS}
    if profile is not None and all(v is None for v in knobs.values()):
        knobs.update(profile.knobs)
    return options, knobs


def _run(args) -> None:
    if args.prompt is None and not args.chat:
        raise UsageError("give --prompt TEXT (or --chat for a conversation)")
    options, knobs = _settings(args)
    _start_compile(options)
    from edge_moe.api import load
    from edge_moe.runtime.bit_policy import BitRequest
    from edge_moe.runtime.sampling import check_sampling

    check_sampling(args.temperature, args.top_p, args.max_tokens)  # before minutes of loading
    BitRequest.make(**knobs)
    model = load(args.model, **options)
    if model.memory_plan.budget is not None:
        print(f"[{model.memory_plan.describe()}]", file=sys.stderr)
    if args.chat:
        _chat(model, args, knobs)
        model.close()
        return
    model.encode(args.prompt)  # a model file without a tokenizer is refused before the echo
    print(args.prompt, end="", flush=True)
    with warnings.catch_warnings(record=True) as caught:  # shown after the text, not inside it
        warnings.simplefilter("default")
        try:
            for piece in model.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed, **knobs):
                print(piece, end="", flush=True)
        finally:
            print(flush=True)  # an error goes on its own line, not after the echoed prompt
            for w in caught:
                _one_line_warning(w.message, w.category, w.filename, w.lineno)
    if args.stats:
        _print_stats(model.stats)
    model.close()


def _chat(model, args, knobs: dict) -> None:
    """One turn for --prompt, else a loop over lines read from stdin (the conversation kept)."""
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, **knobs}
    messages, turns = [], [args.prompt] if args.prompt is not None else _lines()
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = []
        for piece in model.chat_stream(messages, **sampling):
            print(piece, end="", flush=True)
            reply.append(piece)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    if args.stats:
        _print_stats(model.stats)


def _lines():
    """The user's messages, one a line, prompted for when stdin is a terminal; ends at EOF."""
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if line.strip():
            yield line


SIZE_STATS = ("peak_rss", "peak_rss_process", "memory_budget", "bytes_read", "bytes_read_per_token")


def _print_stats(stats: dict) -> None:
    for key, value in stats.items():
        if key in SIZE_STATS and value is not None:
            value = format_size(value)
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}", file=sys.stderr)


def _inspect(args) -> None:
    from edge_moe.api import describe

    d = describe(args.model)
    if args.verify:
        _verify(d["path"])
    by_bits = d.pop("expert_bytes_by_bits")
    for key, value in d.items():
        print(f"{key:32s} {value:,}" if isinstance(value, int) else f"{key:32s} {value}")
    print("experts at each width (all layers):")
    for bits, nbytes in by_bits.items():
        total = nbytes + d["dense_bytes"]
        print(f"  {bits} bits: experts {format_size(nbytes):>10s}   model {format_size(total):>10s}")


def _verify(path: str) -> None:
    """Every checksum of the file, with a progress bar; a mismatch is a FormatError naming the blob."""
    from tqdm import tqdm

    from edge_moe.format.container import Container

    with Container(path) as c, tqdm(total=c.data_bytes(), unit="B", unit_scale=True, desc="verifying",
                                    leave=False) as bar:
        checked = c.verify_all(progress=bar.update)
    print(f"{'checksums':32s} all match ({format_size(checked)} read)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-moe", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-moe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint dir into an .emoe file")
    c.add_argument("src", help="Hugging Face checkpoint directory (config.json, *.safetensors)")
    c.add_argument("dst", help="output .emoe file")
    c.add_argument("--scheme", default="msb", choices=["msb", "mwq"],
                   help="nesting scheme: msb = slices of one 8-bit code (default, best measured "
                        "quality), mwq = D2MoE residual sign planes")
    c.add_argument("--group", type=int, default=128, help="quantization group size along inputs")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)
    r = sub.add_parser("run", help="generate text (the shipped demo model when MODEL is omitted)")
    r.add_argument("model", nargs="?", default=None, help=".emoe file (default: the demo model)")
    r.add_argument("--prompt", default=None, help="text to continue; with --chat, the user's message")
    r.add_argument("--chat", action="store_true",
                   help="talk through the model's chat template: one turn with --prompt, else a prompt loop")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--bits", type=int, default=None, help="every expert at this width, 2..8 (default 8)")
    r.add_argument("--quality", type=float, default=None,
                   help="0..1: experts carrying this share of a token's gate weight get --max-bits, "
                        "the rest --min-bits (computed with the levels resident when late)")
    r.add_argument("--min-bits", type=int, default=None, help="lowest width with --quality (default 2)")
    r.add_argument("--max-bits", type=int, default=None, help="highest width with --quality (default 8)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    _model_flags(r)
    r.add_argument("--stats", action="store_true", help="print timing and I/O stats to stderr")
    r.set_defaults(func=_run)
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (pip install 'edge-moe[serve]')")
    v.add_argument("model", nargs="?", default=None, help=".emoe file (default: the demo model)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    v.add_argument("--port", type=int, default=8080)
    v.add_argument("--max-batch", type=int, default=None,
                   help="requests generated together, one forward per step (each has a KV cache of "
                        "--max-context tokens in the memory plan; default 4)")
    v.add_argument("--max-queue", type=int, default=16, help="requests that wait for a slot before 429s")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    v.add_argument("--model-name", default=None, help="the model's id in the API (default: the file's name)")
    _model_flags(v)
    v.set_defaults(func=_serve)
    f = sub.add_parser("profile", help="run a workload and write its memory timeline, trace and summary")
    f.add_argument("model", nargs="?", default=None, help=".emoe file (default: the demo model)")
    f.add_argument("--out", required=True,
                   help="folder for trace.json, summary.md and .json, memory.png, experts.png")
    f.add_argument("--prompt", default=None, help="the workload's prompt (default: a short code prompt)")
    f.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    f.add_argument("--max-tokens", type=int, default=64)
    for flag in ("--bits", "--min-bits", "--max-bits"):
        f.add_argument(flag, type=int, default=None, help=f"as for run's {flag}")
    f.add_argument("--quality", type=float, default=None, help="as for run's --quality")
    _model_flags(f)
    f.set_defaults(func=_profile)
    d = sub.add_parser("device-profile", help="measure this machine and write a device profile (.yaml)")
    d.add_argument("model", nargs="?", default=None, help=".emoe file whose expert shapes are timed (default: "
                                                         "the demo model)")
    d.add_argument("--out", required=True, help="the profile file to write")
    d.set_defaults(func=_device_profile)
    i = sub.add_parser("inspect", help="architecture, parameter counts and bytes per bit width")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--verify", action="store_true", help="read the whole file and check every checksum")
    i.set_defaults(func=_inspect)
    return p


def _profile(args) -> None:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    prompt = args.prompt if args.prompt is not None else "def fibonacci(n):\n    "
    if args.prompt_file is not None:
        try:
            prompt = open(args.prompt_file).read()
        except OSError as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
    options, knobs = _settings(args)
    from edge_moe.runtime.bit_policy import BitRequest
    from edge_moe.runtime.sampling import check_sampling

    check_sampling(0.0, 1.0, args.max_tokens)
    BitRequest.make(**knobs)
    _start_compile(options)
    from edge_moe.profiling import profile

    s = profile(args.model, args.out, prompt, args.max_tokens, knobs, **options)
    print(open(f"{args.out}/summary.md").read(), end="")
    written = ["trace.json", "summary.md", "summary.json", *s["plots"]]
    note = "" if s["plots"] else " (no plots: pip install matplotlib, or the 'plots' extra)"
    print(f"wrote {', '.join(written)} to {args.out}{note}", file=sys.stderr)


def _device_profile(args) -> None:
    from edge_moe.measure import measure, write_profile
    from edge_moe.runtime.profiles import load_profile

    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory; give the profile file's name")
    fields = measure(args.model, progress=lambda text: print(f"edge-moe: {text}", file=sys.stderr, flush=True))
    write_profile(fields, args.out)
    load_profile(args.out)  # what it wrote reads back as a valid profile
    costs = fields["costs"]
    print(f"wrote {args.out}: memory reads {costs['dram_read_gb_s']} GB/s, expert reads "
          f"{costs['disk_read_mb_s']} MB/s buffered and {costs['disk_direct_read_mb_s']} MB/s direct, one "
          f"expert at 4 bits {costs['expert_ms'][4]} ms")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that load a model, shared by run and serve."""
    p.add_argument("--profile", default=None,
                   help="a device profile: a name (laptop-8gb, app-2gb, ...; see profiles/README.md) or a "
                        ".yaml file; the flags given here win over its values")
    p.add_argument("--memory-budget", default=None,
                   help="hard cap on the process's memory, e.g. 6GB, 6GiB, 512MB (default: no cap)")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + output, in tokens (default 2048)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: every core)")
    p.add_argument("--streaming", default=None,
                   help="expert cache policy: hebf, hebf-no-prefetch, lru or on-demand (default: hebf, "
                        "without prefetch below 4 cores)")
    p.add_argument("--gpu-memory-budget", default=None,
                   help="with --device cuda: VRAM for dense weights, KV cache and cached experts")
    p.add_argument("--dense-bits", type=int, default=None,
                   help="embedding, attention and LM head width: 4..8 packs them as bit-planes at load "
                        "(cpu default 8), 16 keeps the file's bf16 (cuda default)")
    p.add_argument("--backend", default=None, help="kernel backend (default: the fastest for the device)")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="read experts around the OS page cache (direct I/O where the file's alignment "
                        "allows, else reads then advice to forget the pages): measures the disk, not RAM")


def _serve(args) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("edge-moe serve needs the serve extra: pip install 'edge-moe[serve]'") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: use 1..65535")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"edge-moe: warning: serving on {args.host} without --api-key: anyone who can reach it may "
              "use it", file=sys.stderr)
    options, knobs = _settings(args, serve=True)
    _start_compile(options)
    from edge_moe.api import load
    from edge_moe.server import serve

    model = load(args.model, max_queue=args.max_queue, **options)
    if model.memory_plan.budget is not None:
        print(f"[{model.memory_plan.describe()}]", file=sys.stderr)
    name = args.model_name or model.path.name.removesuffix(".emoe")
    print(f"edge-moe: serving {name} at http://{args.host}:{args.port}/v1 (--max-batch {model.max_batch}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        defaults = {k: v for k, v in knobs.items() if v is not None}
        serve(model, name, args.host, args.port, args.api_key, defaults)
    finally:
        model.close()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"edge-moe: warning: {message}", file=sys.stderr if file is None else file)


def _terminate(signum, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C: a conversion removes its temporary file, compile children are killed."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except EdgeMoeError as e:
        print(f"edge-moe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def console() -> None:
    """The `edge-moe` script: main(), then exit without running C++ static destructors. With a CUDA
    build of torch they fault ~120 MB of library code into RSS at exit, after the work is done
    (`import torch` alone, 16-core GPU machine: peak 495 MB, 616 MB with them), which would break the
    --memory-budget promise on the way out."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
