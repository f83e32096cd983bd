"""Writes a Hugging Face MoE checkpoint with the real shapes of a known model and random weights."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

# --------------------------------------------------------------------------- real configs
# Fields as in the hub config.json of each model (transformers_version dropped).

OLMOE_1B_7B = {  # allenai/OLMoE-1B-7B-0924
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "clip_qkv": None,
    "eos_token_id": 50279,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "pad_token_id": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 50304,
}

QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

MIXTRAL_8X7B = {  # mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}

QWEN2_MOE_A2_7B = {  # Qwen/Qwen1.5-MoE-A2.7B
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

MODELS = {
    "olmoe-1b-7b": OLMOE_1B_7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen2-moe-a2.7b": QWEN2_MOE_A2_7B,
}

DTYPES = {  # --dtype -> (torch dtype, safetensors dtype tag, config torch_dtype)
    "bf16": (torch.bfloat16, "BF16", "bfloat16"),
    "fp16": (torch.float16, "F16", "float16"),
    "fp32": (torch.float32, "F32", "float32"),
}

LINEAR_STD = 0.02  # std of every linear / embedding / bias weight (HF initializer_range)
HOT_CAP = 0.45  # max per-token selection probability of one expert (sign symmetry caps it at ~0.5)
CALIB_SAMPLES = 16384  # Monte Carlo tokens used to calibrate router row scales
CHECK_SAMPLES = 2000  # random hidden vectors used by --check-routing

# ---------------------------------------------------------------------------- tensor plan


@dataclass(frozen=True)
class Spec:
    """One tensor to write: its checkpoint name, shape and how to fill it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" (std LINEAR_STD), "ones" (norms) or "router"


def num_experts(cfg: dict) -> int:
    return cfg.get("num_experts") or cfg["num_local_experts"]


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def attention_specs(cfg: dict, p: str) -> list[Spec]:
    """q/k/v/o projections plus the per-family extras (biases, q/k norms)."""
    d, hd = cfg["hidden_size"], head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    specs = [
        Spec(f"{p}.self_attn.q_proj.weight", (q, d), "normal"),
        Spec(f"{p}.self_attn.k_proj.weight", (kv, d), "normal"),
        Spec(f"{p}.self_attn.v_proj.weight", (kv, d), "normal"),
        Spec(f"{p}.self_attn.o_proj.weight", (d, q), "normal"),
    ]
    family = cfg["model_type"]
    if family == "qwen2_moe":  # q/k/v biases (qkv_bias defaults to True)
        for proj, width in (("q", q), ("k", kv), ("v", kv)):
            specs.append(Spec(f"{p}.self_attn.{proj}_proj.bias", (width,), "normal"))
    elif family == "qwen3_moe":  # per-head RMSNorm over head_dim
        specs += [
            Spec(f"{p}.self_attn.q_norm.weight", (hd,), "ones"),
            Spec(f"{p}.self_attn.k_norm.weight", (hd,), "ones"),
        ]
    elif family == "olmoe":  # RMSNorm over the full projection width
        specs += [
            Spec(f"{p}.self_attn.q_norm.weight", (q,), "ones"),
            Spec(f"{p}.self_attn.k_norm.weight", (kv,), "ones"),
        ]
    return specs


def glu_specs(prefix: str, d: int, inter: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Spec]:
    """A gated MLP: gate/up [I, D], down [D, I]."""
    gate, up, down = names
    return [
        Spec(f"{prefix}.{gate}.weight", (inter, d), "normal"),
        Spec(f"{prefix}.{up}.weight", (inter, d), "normal"),
        Spec(f"{prefix}.{down}.weight", (d, inter), "normal"),
    ]


def is_sparse_layer(cfg: dict, i: int) -> bool:
    """Qwen MoE rule: dense MLP on mlp_only_layers and off the decoder_sparse_step grid."""
    step = cfg.get("decoder_sparse_step", 1)
    return i not in cfg.get("mlp_only_layers", []) and (i + 1) % step == 0


def mlp_specs(cfg: dict, p: str, i: int) -> list[Spec]:
    """Router [E, D] and per-expert weights, named as in the hub checkpoints."""
    d, e = cfg["hidden_size"], num_experts(cfg)
    family = cfg["model_type"]
    if family == "mixtral":
        specs = [Spec(f"{p}.block_sparse_moe.gate.weight", (e, d), "router")]
        for j in range(e):
            specs += glu_specs(
                f"{p}.block_sparse_moe.experts.{j}", d, cfg["intermediate_size"], ("w1", "w3", "w2")
            )
        return specs
    if family != "olmoe" and not is_sparse_layer(cfg, i):
        return glu_specs(f"{p}.mlp", d, cfg["intermediate_size"])
    inter = cfg["intermediate_size"] if family == "olmoe" else cfg["moe_intermediate_size"]
    specs = [Spec(f"{p}.mlp.gate.weight", (e, d), "router")]
    for j in range(e):
        specs += glu_specs(f"{p}.mlp.experts.{j}", d, inter)
    if family == "qwen2_moe":
        specs += glu_specs(f"{p}.mlp.shared_expert", d, cfg["shared_expert_intermediate_size"])
        specs.append(Spec(f"{p}.mlp.shared_expert_gate.weight", (1, d), "normal"))
    return specs


def plan_tensors(cfg: dict) -> list[Spec]:
    """Every tensor of the checkpoint, in layer order: embeddings, layers, final norm, lm_head."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    specs = [Spec("model.embed_tokens.weight", (v, d), "normal")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs.append(Spec(f"{p}.input_layernorm.weight", (d,), "ones"))
        specs += attention_specs(cfg, p)
        specs.append(Spec(f"{p}.post_attention_layernorm.weight", (d,), "ones"))
        specs += mlp_specs(cfg, p, i)
    specs.append(Spec("model.norm.weight", (d,), "ones"))
    if not cfg.get("tie_word_embeddings", False):
        specs.append(Spec("lm_head.weight", (v, d), "normal"))
    return specs


def plan_shards(specs: list[Spec], elem_bytes: int, shard_bytes: int) -> list[list[Spec]]:
    """Greedy split into shards of at most shard_bytes (a larger single tensor gets its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        n = math.prod(s.shape) * elem_bytes
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


# ----------------------------------------------------------------------------- generation


def generator_for(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name), so generation order does not matter."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def zipf_targets(e: int, k: int, zipf: float) -> torch.Tensor:
    """Per-token selection probability by popularity rank: k * (r+1)^-zipf / sum, capped at HOT_CAP.

    Probabilities sum to k (k experts per token); mass above the cap is water-filled onto the rest.
    """
    z = torch.arange(1, e + 1, dtype=torch.float64).pow(-zipf)
    p = torch.zeros(e, dtype=torch.float64)
    free = torch.ones(e, dtype=torch.bool)
    while True:
        budget = k - p[~free].sum()
        p[free] = budget * z[free] / z[free].sum()
        over = free & (p > HOT_CAP)
        if not over.any():
            return p
        p[over] = HOT_CAP
        free &= ~over


_SCALE_CACHE: dict[tuple, torch.Tensor] = {}


def router_scales(e: int, k: int, zipf: float, seed: int) -> torch.Tensor:
    """Router row scales [E] by popularity rank, such that zero-mean inputs hit zipf_targets.

    Method: for an input h with i.i.d. unit-variance components (what RMSNorm of a random hidden
    state gives), logit_e = w_e . h is ~ N(0, |w_e|^2), nearly independent across experts since
    random rows in D dims are nearly orthogonal. A bias direction cannot work because h has no
    consistent sign, but a larger row norm makes an expert's logit more often extreme, so it wins
    top-k more often (up to ~50%: it still loses whenever its logit is negative). We therefore
    fit the row norms sigma_e by a damped fixed-point iteration on simulated logits
    sigma_e * N(0, 1) until top-k frequencies match the Zipf targets, then normalise RMS(sigma) = 1.
    """
    key = (e, k, zipf, seed)
    if key not in _SCALE_CACHE:
        target = zipf_targets(e, k, zipf).float()
        z = torch.randn(CALIB_SAMPLES, e, generator=generator_for(seed, "router-calibration"))
        log_s = torch.zeros(e)
        for _ in range(150):
            idx = (z * log_s.exp()).topk(k, dim=1).indices
            freq = torch.bincount(idx.flatten(), minlength=e).float() / CALIB_SAMPLES
            step = 0.5 * (target.clamp_min(1e-4).log() - freq.clamp_min(1e-4).log())
            log_s += step.clamp(-0.2, 0.2)
            log_s -= log_s.mean()
        s = log_s.exp()
        _SCALE_CACHE[key] = s / s.pow(2).mean().sqrt()
    return _SCALE_CACHE[key]


def popularity_order(seed: int, router_name: str, e: int) -> torch.Tensor:
    """Expert ids from hottest to coldest; a different random permutation per layer."""
    return torch.randperm(e, generator=generator_for(seed, router_name + ":popularity"))


def make_router(spec: Spec, cfg: dict, args: argparse.Namespace, dtype: torch.dtype) -> torch.Tensor:
    """Router [E, D]: random unit-ish rows, row e scaled by the sigma of its popularity rank."""
    e, d = spec.shape
    w = torch.empty(e, d).normal_(0.0, 1.0 / math.sqrt(d), generator=generator_for(args.seed, spec.name))
    scales = router_scales(e, cfg["num_experts_per_tok"], args.zipf, args.seed)
    per_expert = torch.empty(e)
    per_expert[popularity_order(args.seed, spec.name, e)] = scales  # rank r -> expert order[r]
    return (w * per_expert[:, None]).to(dtype)


def make_tensor(spec: Spec, cfg: dict, args: argparse.Namespace, dtype: torch.dtype) -> torch.Tensor:
    """The tensor for one spec; deterministic given --seed and the tensor name."""
    if spec.kind == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.kind == "router":
        return make_router(spec, cfg, args, dtype)
    out = torch.empty(spec.shape, dtype=dtype)
    return out.normal_(0.0, LINEAR_STD, generator=generator_for(args.seed, spec.name))


# -------------------------------------------------------------------------------- writing


def safetensors_header(specs: list[Spec], dtype_tag: str, elem_bytes: int) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file, padded to 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        n = math.prod(s.shape) * elem_bytes
        header[s.name] = {"dtype": dtype_tag, "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, specs: list[Spec], cfg: dict, args, bar: tqdm) -> None:
    """Stream one shard: header first, then each tensor generated and written in turn."""
    dtype, tag, _ = DTYPES[args.dtype]
    elem = torch.tensor([], dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.write(safetensors_header(specs, tag, elem))
        for s in specs:
            t = make_tensor(s, cfg, args, dtype).contiguous()
            f.write(t.view(torch.uint8).numpy().data)  # raw little-endian bytes, no copy
            del t
            bar.update(1)


def write_weights(out: Path, cfg: dict, args) -> int:
    """All shards plus model.safetensors.index.json; returns total bytes."""
    dtype = DTYPES[args.dtype][0]
    elem = torch.tensor([], dtype=dtype).element_size()
    specs = plan_tensors(cfg)
    shards = plan_shards(specs, elem, int(args.shard_gb * 1e9))
    total = sum(math.prod(s.shape) for s in specs) * elem
    weight_map = {}
    with tqdm(total=len(specs), unit="tensor", desc="writing") as bar:
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            bar.set_postfix_str(fname)
            write_shard(out / fname, shard, cfg, args, bar)
            weight_map.update({s.name: fname for s in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def build_config(args) -> dict:
    """The real config of --like, with --layers and --dtype applied."""
    cfg = json.loads(json.dumps(MODELS[args.like]))  # deep copy
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = min(cfg["max_window_layers"], args.layers)
    cfg["torch_dtype"] = DTYPES[args.dtype][2]
    return cfg


TOKENIZER_TEXT = """\
Mixture-of-Experts language models route every token to a few experts out of many. Each expert
is a small feed-forward network; the router scores the experts for a token and keeps the top k.
Because only the chosen experts run, a model with tens of billions of parameters computes like a
model of a few billion. On a device with little memory, most experts must live on disk or in
compressed form and be loaded when the router asks for them. Some experts are hot and used by
most tokens; others are cold. Caching the hot ones, prefetching the next layer, and overlapping
reads with compute decide how fast the model runs. The quick brown fox jumps over the lazy dog.
def forward(self, hidden_states): return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " # % & @ _ | ~ ^ ` \\ $
"""


def write_tokenizer(out: Path) -> None:
    """A tiny byte-level BPE (vocab 512) trained on TOKENIZER_TEXT, only so tools can carry one.

    It is NOT the model's real tokenizer: ids are < 512 while config.vocab_size keeps the real size,
    and the config's bos/eos ids do not match its single special token <|endoftext|> (id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def write_provenance(out: Path, cfg: dict, args) -> None:
    """synthetic.json: how the checkpoint was made and each layer's experts, hottest first."""
    e, k = num_experts(cfg), cfg["num_experts_per_tok"]
    layers = {}
    for s in plan_tensors(cfg):
        if s.kind == "router":
            layers[s.name] = popularity_order(args.seed, s.name, e).tolist()
    info = {
        "like": args.like,
        "seed": args.seed,
        "zipf": args.zipf,
        "dtype": args.dtype,
        "target_selection_prob_by_rank": [round(x, 5) for x in zipf_targets(e, k, args.zipf).tolist()],
        "experts_hottest_first": layers,
    }
    (out / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n")


# --------------------------------------------------------------------------------- checks


def check_routing(cfg: dict, args) -> None:
    """Route CHECK_SAMPLES random normal vectors (after RMSNorm) through each router; print skew."""
    dtype = DTYPES[args.dtype][0]
    e, k, d = num_experts(cfg), cfg["num_experts_per_tok"], cfg["hidden_size"]
    hot = max(1, round(e / 10))
    target = zipf_targets(e, k, args.zipf)[:hot].sum().item() / k
    h = torch.randn(CHECK_SAMPLES, d, generator=generator_for(args.seed, "check-routing"))
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])).to(dtype)
    print(f"routing check: {CHECK_SAMPLES} random hidden vectors, top-{k} of {e} experts, zipf {args.zipf}")
    print(f"  hottest 10% = {hot} of {e} experts: target share {target:.1%}, uniform {hot / e:.1%}")
    shares = []
    for s in (s for s in plan_tensors(cfg) if s.kind == "router"):
        logits = (h @ make_router(s, cfg, args, dtype).T).float()
        freq = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=e).float()
        freq = (freq / freq.sum()).sort(descending=True).values
        shares.append(freq[:hot].sum().item())
        print(
            f"  {s.name}: hottest {hot} get {shares[-1]:.1%} of selections, hottest one {freq[0]:.1%}, "
            f"coldest one {freq[-1]:.2%} (uniform {1 / e:.2%} each)"
        )
    print(f"  mean over {len(shares)} layers: hottest {hot} experts get {sum(shares) / len(shares):.1%}")


# ----------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Write a Hugging Face-format MoE checkpoint with the real tensor names and shapes "
        "of a known model and random weights (for memory/speed benchmarks).",
        epilog="Example: make_synthetic_checkpoint.py --like olmoe-1b-7b --layers 2 /tmp/olmoe-2l",
    )
    add = ap.add_argument
    add("out_dir", nargs="?", type=Path, metavar="OUT_DIR", help="directory to create (refused if it exists)")
    add("--like", required=True, choices=sorted(MODELS), help="which real model's shapes to copy")
    add("--layers", type=int, help="override num_hidden_layers (same per-layer shapes, fewer layers)")
    add("--seed", type=int, default=0, help="random seed; output is deterministic given it (default 0)")
    add("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    add("--zipf", type=float, default=1.1, help="rank r picked ~ 1/(r+1)^zipf (default 1.1, 0 = uniform)")
    add("--shard-gb", type=float, default=2.0, help="max shard size in GB (default 2.0)")
    add("--force", action="store_true", help="replace OUT_DIR if it exists")
    add("--check-routing", action="store_true", help="print router skew on random hidden states")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.out_dir is None and not args.check_routing:
        ap.error("OUT_DIR is required (unless only --check-routing is wanted)")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    if args.zipf < 0 or args.shard_gb <= 0:
        ap.error("--zipf must be >= 0 and --shard-gb > 0")
    return args


def check_destination(out: Path, total_bytes: int, force: bool) -> None:
    """Refuse an existing OUT_DIR (unless --force) or a disk without room for the weights."""
    if out.exists() and not force:
        sys.exit(f"error: {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total_bytes > free:
        sys.exit(
            f"error: need {total_bytes / 1e9:.1f} GB but only {free / 1e9:.1f} GB free under {out.parent}; "
            "use --layers to make a smaller model"
        )


def write_checkpoint(out: Path, cfg: dict, args) -> None:
    """Write everything into a temp dir next to OUT_DIR, then rename it into place."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_tokenizer(tmp)
        write_provenance(tmp, cfg, args)
        write_weights(tmp, cfg, args)
        if out.exists():  # only reachable with --force
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    if args.out_dir is not None:
        elem = torch.tensor([], dtype=DTYPES[args.dtype][0]).element_size()
        total = sum(math.prod(s.shape) for s in plan_tensors(cfg)) * elem
        check_destination(args.out_dir, total, args.force)
        layers = cfg["num_hidden_layers"]
        print(f"{args.like}: {layers} layers, {total / 1e9:.2f} GB of {args.dtype} -> {args.out_dir}")
        write_checkpoint(args.out_dir, cfg, args)
    if args.check_routing:
        check_routing(cfg, args)


if __name__ == "__main__":
    main()
