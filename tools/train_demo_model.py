"""Builds edge-moe's demo model: system-text corpus, byte-level BPE tokenizer and a tiny Qwen3-MoE."""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import math
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|im_start|>", "<|im_end|>"]
HELDOUT_PER_MILLE = 20
MAX_DOC_BYTES = 200_000
MAN_ROOT = Path("/usr/share/man")
FORTUNE_ROOT = Path("/usr/share/games/fortunes")
MAN_SECTIONS = ["man1", "man2", "man3", "man4", "man5", "man6", "man7", "man8"]
MAN_FAMILY_CAP = 20
# Share of --max-mb each source may fill. Python is gathered last and additionally capped so
# that it is at most --max-code-share (default 50%) of the whole corpus.
SHARES = {"pydoc": 0.05, "man": 0.40, "fortunes": 0.25, "python": 0.45}
PY_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                "pydoc_data", "encodings", "ensurepip", "__phello__"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_STEPS = 6000  # ~4.2 min on one H100 at batch 64 x 256 (24 steps/s); held-out loss plateaus there
SAMPLE_PROMPTS = ["def ", "import os\n", "NAME\n       ", "The ", "Der ", "class "]


# --------------------------------------------------------------------------- corpus: helpers


def clean_text(text: str) -> str:
    """Normalise newlines, drop special-token strings, clip huge documents at a paragraph break."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, tok.replace("|", ""))
    text = text.strip("\n").rstrip() + "\n"
    if len(text.encode("utf-8")) > MAX_DOC_BYTES:
        cut = text.encode("utf-8")[:MAX_DOC_BYTES].decode("utf-8", "ignore")
        para = cut.rfind("\n\n")
        text = (cut[:para] if para > MAX_DOC_BYTES // 2 else cut).rstrip() + "\n"
    return text


def is_heldout(doc_id: str) -> bool:
    """Deterministic ~2% split by a hash of the document id."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 1000 < HELDOUT_PER_MILLE


def read_utf8(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def interleave(groups: dict[str, list], rng: random.Random) -> list:
    """Shuffle each group (sorted first, so the result is deterministic) and round-robin them."""
    queues = []
    for name in sorted(groups):
        items = sorted(groups[name], key=lambda item: item[0])
        rng.shuffle(items)
        queues.append(items)
    order = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order.extend(q[rank] for q in queues if rank < len(q))
    return order


def take_until(candidates: list, load, budget: int, workers: int = 1) -> list[tuple[str, str]]:
    """Load candidates (id, payload) in order until `budget` bytes are collected; keeps the order."""
    docs, used = [], 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(candidates), 8 * workers):
            chunk = candidates[start:start + 8 * workers]
            for (doc_id, _), text in zip(chunk, pool.map(load, chunk), strict=True):
                if not text or not text.strip():
                    continue
                text = clean_text(text)
                size = len(text.encode("utf-8"))
                if used + size > budget:
                    return docs
                docs.append((doc_id, text))
                used += size
    return docs


# --------------------------------------------------------------------------- corpus: sources


def python_candidates() -> dict[str, list]:
    """CPython stdlib .py files, without tests, site-packages and data-table packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in PY_SKIP_DIRS and not d.startswith(("test", "config-")))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                found.append((f"python:{path.relative_to(root).as_posix()}", path))
    return {"stdlib": found}


def pydoc_candidates() -> dict[str, list]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        print("  pydoc_data is not available: skipping pydoc topics")
        return {}
    return {"topics": [(f"pydoc:{key}", text) for key, text in sorted(topics.items())]}


def man_family(path: Path) -> str:
    return re.split(r"[-_.]", path.name, maxsplit=1)[0]


def man_candidates() -> dict[str, list]:
    """English man pages by section, at most MAN_FAMILY_CAP pages per command family (gcloud-*, git-*)."""
    groups = {}
    rng = random.Random(1234)
    for section in MAN_SECTIONS:
        pages = sorted(p for p in (MAN_ROOT / section).glob("*") if p.is_file() and not p.is_symlink())
        rng.shuffle(pages)
        per_family, kept = {}, []
        for page in pages:
            family = man_family(page)
            per_family[family] = per_family.get(family, 0) + 1
            if per_family[family] <= MAN_FAMILY_CAP:
                kept.append((f"man:{section}/{page.name}", page))
        if kept:
            groups[section] = kept
    return groups


def fortune_language(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else "main"


def fortune_files() -> list[tuple[str, Path]]:
    """Real (non-link) fortune text files, skipping index files and offensive sections."""
    files = []
    for dirpath, dirnames, filenames in os.walk(FORTUNE_ROOT):
        dirnames[:] = sorted(d for d in dirnames if d != "off")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or name.endswith((".dat", ".u8", ".gz")):
                continue
            files.append((fortune_language(path.relative_to(FORTUNE_ROOT)), path))
    return files


def fortune_candidates() -> dict[str, list]:
    """One document per fortune cookie, grouped by language directory; duplicates dropped."""
    if not FORTUNE_ROOT.is_dir():
        print(f"  {FORTUNE_ROOT} not found: no fortunes (apt-get install fortunes fortunes-de ...)")
        return {}
    groups, seen, stats = {}, set(), {}
    for lang, path in fortune_files():
        text = read_utf8(path)
        if text is None:
            print(f"  skipping non-UTF-8 fortune file {path}")
            continue
        rel = path.relative_to(FORTUNE_ROOT).as_posix()
        for idx, cookie in enumerate(re.split(r"\n%\n", "\n" + text + "\n")):
            cookie = cookie.strip("\n")
            if cookie.strip() and cookie not in seen:
                seen.add(cookie)
                groups.setdefault(lang, []).append((f"fortune:{rel}#{idx}", cookie))
        files, size = stats.get(lang, (0, 0))
        stats[lang] = (files + 1, size + len(text.encode("utf-8")))
    for lang, (files, size) in sorted(stats.items()):
        print(f"  fortunes/{lang}: {files} files, {size / 1e6:.2f} MB, {len(groups.get(lang, []))} cookies")
    return groups


# --------------------------------------------------------------------------- corpus: man rendering


def man_renderer(tmp: Path):
    """Pick the best available man renderer: man-db, plain groff, or a built-in roff stripper."""
    (tmp / "adl.tmac").write_text(".ad l\n")  # left-justify: no padding spaces inside lines
    roff_opts = f"-rHY=0 -dAD=l -M{tmp} -madl"
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MANROFFOPT=roff_opts, MAN_DISABLE_SECCOMP="1")
    env.pop("MAN_KEEP_FORMATTING", None)
    if shutil.which("man"):
        return "man -l", lambda path: run_renderer(["man", "-l", str(path)], env)
    if shutil.which("groff"):
        cmd = ["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=78n", *roff_opts.split()]
        return "groff", lambda path: run_renderer(cmd, env, stdin=read_compressed(path))
    return "built-in roff stripper", lambda path: strip_roff(read_compressed(path).decode("utf-8", "replace"))


def run_renderer(cmd: list[str], env: dict, stdin: bytes | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout:
        return None
    text = re.sub(r".\x08", "", out.stdout.decode("utf-8", "replace"))
    text = "\n".join(line.expandtabs().rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text)


def read_compressed(path: Path) -> bytes:
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as fh:
        return fh.read()


def strip_roff(src: str) -> str:
    """Very small roff-to-text fallback for machines without man/groff."""
    lines = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".\\}")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("SH", "SS"):
                lines += ["", rest.strip('"').upper() if macro == "SH" else rest.strip('"')]
            elif macro in ("PP", "LP", "P", "TP", "IP", "sp", "br"):
                lines.append("")
            elif macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB") and rest:
                lines.append(re.sub(r'"', "", rest))
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\s[+-]?\d|\\&|\\c", "", text)
    text = text.replace("\\-", "-").replace("\\(em", "--").replace("\\e", "\\").replace("\\ ", " ")
    return re.sub(r"\n{3,}", "\n\n", text)


def is_man_stub(path: Path) -> bool:
    """True for '.so other/page' redirection stubs."""
    try:
        head = read_compressed(path)[:400].decode("utf-8", "replace")
    except (OSError, EOFError, lzma.LZMAError):
        return True
    body = [ln for ln in head.splitlines() if ln.strip() and not ln.startswith(('.\\"', "'\\\""))]
    return bool(body) and body[0].startswith(".so ")


# --------------------------------------------------------------------------- corpus: assembly


def gather_text_sources(max_bytes: int, seed: int) -> tuple[dict[str, list], str]:
    """Collect pydoc topics, man pages and fortunes, each up to its share of the byte budget."""
    docs = {}
    print("pydoc topics:")
    docs["pydoc"] = take_until(interleave(pydoc_candidates(), random.Random(f"{seed}:pydoc")),
                               lambda c: c[1], int(SHARES["pydoc"] * max_bytes))
    print("man pages:")
    groups = man_candidates()
    renderer = "none"
    if not groups:
        print(f"  no man pages under {MAN_ROOT}/man[1-8]: continuing without them")
        docs["man"] = []
    else:
        with tempfile.TemporaryDirectory() as tmp:
            renderer, render = man_renderer(Path(tmp))
            print(f"  {sum(map(len, groups.values()))} candidate pages, rendering with {renderer}")
            load = lambda c: None if is_man_stub(c[1]) else render(c[1])  # noqa: E731
            docs["man"] = take_until(interleave(groups, random.Random(f"{seed}:man")), load,
                                     int(SHARES["man"] * max_bytes), workers=max(2, os.cpu_count() or 2))
    print("fortunes:")
    docs["fortunes"] = take_until(interleave(fortune_candidates(), random.Random(f"{seed}:fortunes")),
                                  lambda c: c[1], int(SHARES["fortunes"] * max_bytes))
    return docs, renderer


def gather_corpus(max_bytes: int, seed: int, code_share: float) -> tuple[dict[str, list], str]:
    docs, renderer = gather_text_sources(max_bytes, seed)
    others = sum(len(t.encode("utf-8")) for items in docs.values() for _, t in items)
    code_share = min(max(code_share, 0.0), 0.95)
    budget = int(min(SHARES["python"] * max_bytes, others * code_share / (1 - code_share), max_bytes - others))
    print(f"python stdlib ({sysconfig.get_paths()['stdlib']}), budget {budget / 1e6:.1f} MB:")
    if others < 0.2 * max_bytes:
        print("  WARNING: little non-code text found; the corpus will be small (install man pages/fortunes)")
    candidates = interleave(python_candidates(), random.Random(f"{seed}:python"))
    docs["python"] = take_until(candidates, lambda c: read_utf8(c[1]), budget)
    return docs, renderer


def doc_group(doc_id: str) -> str:
    source, _, rest = doc_id.partition(":")
    if source == "man":
        return rest.split("/")[0]
    if source == "fortune":
        return fortune_language(Path(rest.split("#")[0]))
    return source


def write_split(out_dir: Path, docs: dict[str, list], seed: int) -> dict:
    """Shuffle all documents together and write train.txt / heldout.txt, each document followed by EOT."""
    flat = [(src, doc_id, text) for src, items in docs.items() for doc_id, text in items]
    flat.sort(key=lambda d: d[1])
    random.Random(f"{seed}:order").shuffle(flat)
    stats = {}
    with open(out_dir / "train.txt", "w", encoding="utf-8") as train, \
            open(out_dir / "heldout.txt", "w", encoding="utf-8") as held:
        for src, doc_id, text in flat:
            split = "heldout" if is_heldout(doc_id) else "train"
            (held if split == "heldout" else train).write(text + EOT)
            entry = stats.setdefault(src, {"docs": 0, "train_bytes": 0, "heldout_bytes": 0, "groups": {}})
            size = len(text.encode("utf-8"))
            entry["docs"] += 1
            entry[f"{split}_bytes"] += size
            entry["groups"][doc_group(doc_id)] = entry["groups"].get(doc_group(doc_id), 0) + size
    return stats


def cmd_corpus(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    docs, renderer = gather_corpus(int(args.max_mb * 1e6), args.seed, args.max_code_share)
    stats = write_split(out_dir, docs, args.seed)
    total = sum(s["train_bytes"] + s["heldout_bytes"] for s in stats.values())
    for entry in stats.values():
        entry["bytes"] = entry["train_bytes"] + entry["heldout_bytes"]
        entry["share"] = round(entry["bytes"] / max(total, 1), 4)
    manifest = {
        "max_mb": args.max_mb, "seed": args.seed, "document_separator": EOT,
        "heldout_rule": f"sha256(doc_id) % 1000 < {HELDOUT_PER_MILLE}", "man_renderer": renderer,
        "locations": {"python": sysconfig.get_paths()["stdlib"], "man": str(MAN_ROOT),
                      "fortunes": str(FORTUNE_ROOT)},
        "python_version": sys.version.split()[0], "total_bytes": total,
        "train_bytes": os.path.getsize(out_dir / "train.txt"),
        "heldout_bytes": os.path.getsize(out_dir / "heldout.txt"), "sources": stats,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print_corpus_summary(manifest, time.time() - start)


def print_corpus_summary(manifest: dict, seconds: float) -> None:
    print(f"\n{'source':<10} {'docs':>7} {'MB':>8} {'share':>6}  groups (MB)")
    for src, entry in manifest["sources"].items():
        groups = ", ".join(f"{g} {b / 1e6:.2f}" for g, b in sorted(entry["groups"].items()))
        print(f"{src:<10} {entry['docs']:>7} {entry['bytes'] / 1e6:>8.2f} {entry['share']:>6.1%}  {groups}")
    print(f"total {manifest['total_bytes'] / 1e6:.2f} MB: train.txt {manifest['train_bytes'] / 1e6:.2f} MB, "
          f"heldout.txt {manifest['heldout_bytes'] / 1e6:.2f} MB ({seconds:.0f} s)")


# --------------------------------------------------------------------------- tokenizer and data


def read_docs(path: Path) -> list[str]:
    if not path.is_file():
        sys.exit(f"error: {path} not found; build it with: train_demo_model.py corpus {path.parent}")
    return [doc for doc in path.read_text(encoding="utf-8").split(EOT) if doc.strip()]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def encode_docs(tok, docs: list[str], desc: str):
    """Token ids of all documents, each followed by <|endoftext|>, as one uint16 array."""
    import numpy as np
    from tqdm import tqdm

    eot = tok.token_to_id(EOT)
    parts = []
    for start in tqdm(range(0, len(docs), 2048), desc=desc, unit="chunk", leave=False):
        for enc in tok.encode_batch(docs[start:start + 2048], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eot], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def write_tokenizer_files(tok, out_dir: Path, max_len: int) -> None:
    """tokenizer.json plus a PreTrainedTokenizerFast-compatible tokenizer_config.json."""
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
        "bos_token": None, "eos_token": EOT, "pad_token": EOT, "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "added_tokens_decoder": added,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- model


def build_config(args: argparse.Namespace, tok):
    from transformers import Qwen3MoeConfig

    eot, im_end = tok.token_to_id(EOT), tok.token_to_id("<|im_end|>")
    return Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        output_router_logits=True, router_aux_loss_coef=args.aux_coef, use_sliding_window=False,
        bos_token_id=eot, eos_token_id=[eot, im_end], pad_token_id=eot, attention_dropout=0.0)


def param_report(model) -> dict:
    """Parameter counts and the expected size in edge-moe's nested 8-bit format."""
    cfg = model.config
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())
    dense = total - expert
    return {
        "total": total, "dense": dense, "expert": expert,
        "active_per_token": dense + expert * cfg.num_experts_per_tok // cfg.num_experts,
        "expected_converted_mb": round((2.0 * dense + 1.1 * expert) / 1e6, 2),
        "bf16_checkpoint_mb": round(2.0 * total / 1e6, 2),
    }


def print_param_report(report: dict) -> None:
    print(f"parameters: total {report['total']:,} = dense {report['dense']:,} + experts {report['expert']:,}; "
          f"active/token {report['active_per_token']:,}")
    print(f"expected size: {report['expected_converted_mb']:.2f} MB converted (dense bf16 2 B/param + "
          f"experts 8-bit ~1.1 B/param), bf16 checkpoint {report['bf16_checkpoint_mb']:.2f} MB")


def make_optimizer(model, lr: float, weight_decay: float):
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **fused)


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over --warmup steps, then cosine decay to 10% following training progress."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = 0.1 * args.lr
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------- training


def autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_batch(tokens, batch: int, seq: int, gen):
    import torch

    offsets = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen, device=tokens.device)
    chunk = tokens[offsets[:, None] + torch.arange(seq + 1, device=tokens.device)].long()
    return chunk[:, :-1], chunk[:, 1:]


def train_step(model, opt, x, y, args: argparse.Namespace):
    import torch
    import torch.nn.functional as F

    with autocast(x.device):
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        aux = balance_loss(out.router_logits, args.top_k)
        loss = ce + args.aux_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return ce.detach(), aux.detach()


def balance_loss(router_logits, top_k: int):
    """Switch-style load-balancing loss averaged over layers (1.0 = perfectly balanced).
    transformers' built-in aux loss pools the router logits of all layers, which lets an
    expert die in one layer as long as it is busy in another; this one balances every layer."""
    import torch
    import torch.nn.functional as F

    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        picks = probs.topk(top_k, dim=-1).indices
        routed = F.one_hot(picks, probs.shape[-1]).float().sum(dim=1).mean(dim=0) / top_k
        losses.append(probs.shape[-1] * (routed * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def evaluate(model, tokens, seq: int, windows: int, batch: int = 32) -> dict:
    """Loss over non-overlapping held-out windows, plus the share of routed tokens per expert."""
    import torch
    import torch.nn.functional as F

    cfg, n = model.config, min(windows, (len(tokens) - 1) // seq)
    nll, count = 0.0, 0
    usage = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, device=tokens.device)
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch):
            rows = torch.arange(start, min(n, start + batch), device=tokens.device)[:, None] * seq
            chunk = tokens[rows + torch.arange(seq + 1, device=tokens.device)].long()
            with autocast(tokens.device):
                out = model(input_ids=chunk[:, :-1], output_router_logits=True, use_cache=False)
            logits = out.logits.float().flatten(0, 1)
            nll += F.cross_entropy(logits, chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
            for layer, logits in enumerate(out.router_logits):
                picks = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
                usage[layer] += torch.bincount(picks, minlength=cfg.num_experts).float()
    model.train()
    loss = nll / max(count, 1)
    share = (usage / usage.sum(-1, keepdim=True).clamp(min=1)).cpu()
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count,
            "expert_share_min": round(share.min().item(), 4), "expert_share_max": round(share.max().item(), 4),
            "expert_share": [[round(v, 4) for v in row] for row in share.tolist()]}


def training_progress(step: int, elapsed: float, args: argparse.Namespace) -> float:
    """Fraction done, by steps or by wall-clock minutes, whichever is further along."""
    parts = []
    if args.steps:
        parts.append(step / args.steps)
    if args.minutes:
        parts.append(elapsed / (60.0 * args.minutes))
    return max(parts)


def flush_train_loss(state: dict) -> float:
    """Mean training loss since the last flush (one GPU sync), remembered in state['recent']."""
    if state["pending_n"]:
        state["recent"] = (state["recent"] + [state["pending"].item() / state["pending_n"]])[-10:]
        state["pending"], state["pending_n"] = 0.0, 0
    return state["recent"][-1] if state["recent"] else float("nan")


def log_progress(state: dict, model, data: dict, args: argparse.Namespace, bar) -> None:
    """Every few steps update the bar; every --eval-every steps print held-out perplexity."""
    step = state["step"]
    if step % args.log_every == 0 or step % args.eval_every == 0 or step == 1:
        ce = flush_train_loss(state)
        tok_s = step * args.batch_size * args.seq_len / max(time.time() - state["start"], 1e-9)
        bar.set_postfix(loss=f"{ce:.3f}", aux=f"{state['aux'].item():.3f}", lr=f"{state['lr']:.2e}",
                        tok_s=f"{tok_s:,.0f}")
    if step % args.eval_every == 0:
        ev = evaluate(model, data["heldout"], args.seq_len, args.eval_windows)
        state["history"].append({"step": step, "seconds": round(time.time() - state["start"], 1),
                                 "train_loss": round(ce, 4), "heldout_loss": round(ev["loss"], 4)})
        bar.write(f"step {step:>6}  train loss {ce:.3f}  held-out loss {ev['loss']:.3f}  ppl {ev['ppl']:.1f}  "
                  f"expert share {ev['expert_share_min']:.2f}..{ev['expert_share_max']:.2f}")


def train_loop(model, data: dict, args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    device = data["train"].device
    opt = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    state = {"step": 0, "start": time.time(), "history": [], "recent": [], "pending": 0.0, "pending_n": 0}
    bar = tqdm(total=args.steps or None, unit="step", dynamic_ncols=True, mininterval=2.0)
    model.train()
    while (progress := training_progress(state["step"], time.time() - state["start"], args)) < 1.0:
        state["lr"] = lr_at(state["step"], progress, args)
        for group in opt.param_groups:
            group["lr"] = state["lr"]
        x, y = sample_batch(data["train"], args.batch_size, args.seq_len, gen)
        ce, state["aux"] = train_step(model, opt, x, y, args)
        state["pending"] = state["pending"] + ce
        state["pending_n"] += 1
        state["step"] += 1
        bar.update(1)
        log_progress(state, model, data, args, bar)
    bar.close()
    flush_train_loss(state)
    state["seconds"] = time.time() - state["start"]
    return state


# --------------------------------------------------------------------------- saving and checks


def split_fused_experts(tensors: dict) -> dict:
    """Rewrite fused `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] into hub-style
    per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` tensors."""
    out = {}
    for key, value in tensors.items():
        prefix = key.rsplit(".", 1)[0]
        if key.endswith("mlp.experts.gate_up_proj"):
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = value[e, :inter].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = value[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].clone()
        else:
            out[key] = value
    return out


def normalize_expert_keys(out_dir: Path) -> bool:
    """Make sure the checkpoint uses per-expert tensor names whatever transformers version saved it."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "model.safetensors"
    if not path.is_file():
        sys.exit(f"error: {path} missing (sharded save?); the demo model must fit in one file")
    tensors = load_file(str(path))
    if not any(k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) for k in tensors):
        return False
    save_file(split_fused_experts(tensors), str(path), metadata={"format": "pt"})
    return True


def add_config_aliases(out_dir: Path) -> None:
    """transformers v5 writes `num_local_experts` and `rope_parameters`; hub Qwen3-MoE configs (and
    older readers) use `num_experts` and `rope_theta`, so config.json carries both spellings."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if "num_experts" not in config and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    if "rope_theta" not in config and isinstance(config.get("rope_parameters"), dict):
        config["rope_theta"] = config["rope_parameters"].get("rope_theta")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def describe_keys(out_dir: Path) -> list[str]:
    """Names, shapes and dtypes of the saved tensors outside layers 1.. (layer 0 stands for all)."""
    from safetensors import safe_open

    lines = []
    with safe_open(str(out_dir / "model.safetensors"), "pt") as fh:
        keys = sorted(fh.keys())
        for key in keys:
            if ".layers." in key and ".layers.0." not in key:
                continue
            piece = fh.get_slice(key)
            lines.append(f"{key} {list(piece.get_shape())} {piece.get_dtype()}")
    lines.append(f"({len(keys)} tensors in total)")
    return lines


def save_checkpoint(model, tok, args: argparse.Namespace, out_dir: Path):
    """save_pretrained in bf16 (+ tokenizer files, generation config); returns the bf16 CPU model."""
    import torch
    from transformers import GenerationConfig

    eot, im_end = tok.token_to_id(EOT), tok.token_to_id("<|im_end|>")
    model = model.to("cpu")
    for param in model.parameters():  # parameters only: RoPE's inv_freq buffer must stay fp32
        param.data = param.data.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[eot, im_end], pad_token_id=eot, do_sample=True, temperature=0.8,
        top_k=40, top_p=0.95, repetition_penalty=1.1, max_new_tokens=128)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if normalize_expert_keys(out_dir):
        print("note: transformers saved fused expert tensors; rewrote them as per-expert tensors")
    add_config_aliases(out_dir)
    write_tokenizer_files(tok, out_dir, args.max_positions)
    return model


def verify_reload(model, out_dir: Path, tokens) -> float:
    """Reload with AutoModelForCausalLM and compare fp32 logits with the saved (bf16-rounded) weights
    held in memory: any naming or layout slip in the checkpoint shows up as a large difference."""
    import torch
    from transformers import AutoModelForCausalLM

    for param in model.parameters():
        param.data = param.data.float()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    x = tokens[:128].long().cpu()[None]
    with torch.no_grad():
        diff = (model(input_ids=x).logits - reloaded(input_ids=x).logits).abs().max().item()
    if diff > 1e-3:
        sys.exit(f"error: reloaded checkpoint disagrees with the trained model (max logit diff {diff:.4f})")
    return diff


def generate_samples(out_dir: Path, prompts: list[str], max_new: int = 48, seed: int = 0) -> dict:
    """Load the saved model and tokenizer from disk, as a user would, and sample continuations."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    samples = {}
    for prompt in prompts:
        torch.manual_seed(seed)
        ids = torch.tensor([tok.encode(prompt).ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=True, temperature=0.8, top_k=40)
        samples[prompt] = tok.decode(out[0].tolist(), skip_special_tokens=False)
    return samples


# --------------------------------------------------------------------------- train command


def resolve_device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but torch sees no CUDA device")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def apply_defaults(args: argparse.Namespace, device) -> None:
    """Device-dependent defaults: big batches on a GPU, small ones for CPU smoke tests."""
    gpu = device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 64 if gpu else 8
    if args.eval_windows is None:
        args.eval_windows = 2048 if gpu else 32
    if args.final_eval_windows is None:
        args.final_eval_windows = 2048 if gpu else 64
    if args.steps is None and args.minutes is None:
        args.steps = DEFAULT_STEPS
    args.warmup = max(1, min(args.warmup, args.steps // 10 if args.steps else args.warmup))


def prepare_data(corpus: Path, args: argparse.Namespace, device) -> tuple:
    import torch

    start = time.time()
    train_docs, held_docs = read_docs(corpus / "train.txt"), read_docs(corpus / "heldout.txt")
    tok = train_tokenizer(train_docs, args.vocab_size)
    print(f"tokenizer: {tok.get_vocab_size()} tokens trained on {len(train_docs)} documents "
          f"({time.time() - start:.0f} s)")
    train_ids = encode_docs(tok, train_docs, "encode train")
    held_ids = encode_docs(tok, held_docs, "encode heldout")
    held_bytes = sum(len(d.encode("utf-8")) for d in held_docs)
    print(f"data: {len(train_ids):,} train tokens, {len(held_ids):,} held-out tokens "
          f"({held_bytes / max(len(held_ids), 1):.2f} bytes/token held out; {time.time() - start:.0f} s)")
    if len(held_ids) < args.seq_len + 2 or len(train_ids) < args.seq_len + 2:
        sys.exit("error: corpus too small for one training window; rebuild it with a larger --max-mb")
    data = {"train": torch.from_numpy(train_ids.astype("int32")).to(device),
            "heldout": torch.from_numpy(held_ids.astype("int32")).to(device), "heldout_bytes": held_bytes}
    return tok, data


def build_model(args: argparse.Namespace, tok, device):
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(build_config(args, tok)).to(device)
    report = param_report(model)
    print_param_report(report)
    if report["expected_converted_mb"] > args.max_model_mb:
        sys.exit(f"error: expected converted size {report['expected_converted_mb']} MB exceeds "
                 f"--max-model-mb {args.max_model_mb}; shrink --hidden/--layers/--experts/--moe-intermediate")
    return model, report


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def run_training(model, data: dict, args: argparse.Namespace) -> tuple:
    """Train (optionally compiled), then evaluate on the held-out windows; returns the plain model."""
    import torch

    device = data["train"].device
    limits = [args.steps and f"{args.steps} steps", args.minutes and f"{args.minutes} minutes"]
    stop = " / ".join(limit for limit in limits if limit)
    print(f"training on {device_name(device)}: batch {args.batch_size} x {args.seq_len} tokens, {stop}")
    state = train_loop(torch.compile(model) if args.compile else model, data, args)
    final = evaluate(model, data["heldout"], args.seq_len, args.final_eval_windows)
    print(f"final: {state['step']} steps in {state['seconds']:.0f} s "
          f"({1000 * state['seconds'] / max(state['step'], 1):.0f} ms/step), "
          f"held-out loss {final['loss']:.3f}, ppl {final['ppl']:.2f} over {final['tokens']:,} tokens")
    return state, final


def export(model, tok, data: dict, args: argparse.Namespace, out_dir: Path) -> dict:
    """Save, verify the reload, copy heldout.txt, list the tensor names and sample from the saved files."""
    model = save_checkpoint(model, tok, args, out_dir)
    diff = verify_reload(model, out_dir, data["heldout"])
    shutil.copyfile(Path(args.corpus) / "heldout.txt", out_dir / "heldout.txt")
    keys = describe_keys(out_dir)
    print("saved tensors (layer 0 shown):\n  " + "\n  ".join(keys))
    samples = generate_samples(out_dir, SAMPLE_PROMPTS, seed=args.seed)
    for prompt, text in samples.items():
        print(f"--- sample {prompt!r}:\n{text}")
    return {"diff": diff, "keys": keys, "samples": samples}


def cmd_train(args: argparse.Namespace) -> None:
    wall = time.time()
    device = resolve_device(args.device)
    apply_defaults(args, device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, data = prepare_data(Path(args.corpus), args, device)
    model, report = build_model(args, tok, device)
    state, final = run_training(model, data, args)
    saved = export(model, tok, data, args, out_dir)
    results = {"device": device_name(device), "state": state, "final": final, "report": report,
               "data": data, "wall": time.time() - wall, **saved}
    write_train_log(out_dir, args, results)


def write_train_log(out_dir: Path, args: argparse.Namespace, results: dict) -> None:
    """train_log.json: losses, perplexity, parameter counts, timings, versions, tensor names, samples."""
    import tokenizers
    import torch
    import transformers

    state, final, data, wall = results["state"], results["final"], results["data"], results["wall"]
    bits_per_byte = final["loss"] / math.log(2) * len(data["heldout"]) / data["heldout_bytes"]
    log = {
        "steps": state["step"], "final_train_loss": round(flush_train_loss(state), 4),
        "heldout_loss": round(final["loss"], 4), "heldout_perplexity": round(final["ppl"], 3),
        "heldout_tokens": final["tokens"],
        "heldout_bits_per_byte": round(bits_per_byte, 4),
        "expert_share": final["expert_share"], "parameters": results["report"],
        "train_seconds": round(state["seconds"], 1), "wall_seconds": round(wall, 1),
        "ms_per_step": round(1000 * state["seconds"] / max(state["step"], 1), 1), "device": results["device"],
        "tokens_seen": state["step"] * args.batch_size * args.seq_len, "train_tokens": len(data["train"]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]},
        "args": {k: v for k, v in vars(args).items() if k != "func"}, "history": state["history"],
        "reload_max_logit_diff": results["diff"], "tensor_keys_layer0": results["keys"],
        "samples": results["samples"],
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out_dir} ({wall:.0f} s in total)")


# --------------------------------------------------------------------------- command line


def add_corpus_parser(sub) -> None:
    p = sub.add_parser("corpus", help="gather the training text into OUT_DIR",
                       description="Gather CPython stdlib sources, pydoc topics, man pages and fortunes "
                                   "deterministically; nothing is installed or downloaded.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write train.txt, heldout.txt and manifest.json")
    p.add_argument("--max-mb", type=float, default=40.0, help="cap on the total text size in MB (default 40)")
    p.add_argument("--max-code-share", type=float, default=0.5,
                   help="largest share of the corpus that Python source may take (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed for the document sampling (default 0)")
    p.set_defaults(func=cmd_corpus)


def add_model_args(p) -> None:
    g = p.add_argument_group("model shape (defaults give ~10.6 MB converted)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size incl. special tokens")
    g.add_argument("--hidden", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=4, help="decoder layers (all MoE)")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    g.add_argument("--head-dim", type=int, default=64, help="attention head size")
    g.add_argument("--experts", type=int, default=8, help="experts per layer")
    g.add_argument("--top-k", type=int, default=2, help="experts routed per token")
    g.add_argument("--moe-intermediate", type=int, default=256, help="expert FFN width")
    g.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings")
    g.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base")
    g.add_argument("--max-model-mb", type=float, default=12.0,
                   help="refuse shapes whose expected converted size exceeds this (default 12)")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train tokenizer + model on a corpus and save a HF checkpoint in OUT_DIR",
                       description="Train a byte-level BPE tokenizer and a small Qwen3-MoE from scratch.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to write")
    p.add_argument("--corpus", required=True, metavar="CORPUS_DIR", help="directory made by the corpus command")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS} unless --minutes is given)")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop after this many minutes of training (with --steps: whichever comes first); "
                        "the LR schedule follows elapsed time")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default 64 on cuda, 8 on cpu)")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=200, help="warmup steps (at most 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--aux-coef", type=float, default=0.01,
                   help="coefficient of the per-layer router load-balancing loss (default 0.01)")
    p.add_argument("--log-every", type=int, default=25, help="steps between progress-bar updates")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows per periodic evaluation (default 2048 on cuda, 32 on cpu)")
    p.add_argument("--final-eval-windows", type=int, default=None,
                   help="held-out windows for the final evaluation (default 2048 on cuda, 64 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (experimental)")
    add_model_args(p)
    p.set_defaults(func=cmd_train)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_corpus_parser(sub)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
