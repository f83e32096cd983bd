"""What an adapter is: HF config -> ModelConfig, and a table of rename rules for tensors."""

from __future__ import annotations

import re

from edge_moe.config import ModelConfig
from edge_moe.errors import UnsupportedArchitecture

# Internal name pattern -> candidate HF name lists; a candidate is a list of tensors concatenated
# along dim 0 (gate and up become gate_up). The first candidate present in the checkpoint wins.
LLAMA_STYLE_RULES = {
    r"embed": [["model.embed_tokens.weight"]],
    r"final_norm": [["model.norm.weight"]],
    r"lm_head": [["lm_head.weight"]],
    r"layers\.(\d+)\.attn_norm": [["model.layers.{0}.input_layernorm.weight"]],
    r"layers\.(\d+)\.ffn_norm": [["model.layers.{0}.post_attention_layernorm.weight"]],
    r"layers\.(\d+)\.(q|k|v|o)": [["model.layers.{0}.self_attn.{1}_proj.weight"]],
    r"layers\.(\d+)\.(q|k|v)_bias": [["model.layers.{0}.self_attn.{1}_proj.bias"]],
    r"layers\.(\d+)\.(q|k)_norm": [["model.layers.{0}.self_attn.{1}_norm.weight"]],
    r"layers\.(\d+)\.router": [["model.layers.{0}.mlp.gate.weight"]],
    r"layers\.(\d+)\.mlp_gate_up": [["model.layers.{0}.mlp.gate_proj.weight",
                                     "model.layers.{0}.mlp.up_proj.weight"]],
    r"layers\.(\d+)\.mlp_down": [["model.layers.{0}.mlp.down_proj.weight"]],
}

# Experts: per-expert tensors as on the hub, or the fused 3-D tensors transformers v5 can write.
PER_EXPERT = {"gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
              "up": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
              "down": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"}
FUSED_EXPERTS = {"gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",
                 "down": "model.layers.{layer}.mlp.experts.down_proj"}


class Adapter:
    """One Hugging Face model_type; subclasses override config() and the rule tables."""

    model_type = ""
    rules = LLAMA_STYLE_RULES
    per_expert = PER_EXPERT
    fused_experts = FUSED_EXPERTS

    def config(self, hf: dict) -> ModelConfig:
        raise NotImplementedError

    def candidates(self, name: str) -> list[list[str]]:
        """HF tensor-name candidates for an internal dense tensor name."""
        for pattern, cands in self.rules.items():
            m = re.fullmatch(pattern, name)
            if m:
                return [[c.format(*m.groups()) for c in cand] for cand in cands]
        raise KeyError(f"no rename rule for internal tensor {name!r} in adapter {self.model_type}")


def rope_theta(hf: dict, default: float = 10000.0) -> float:
    """rope_theta from a v4 (top level) or v5 (rope_parameters) config; only plain RoPE."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedArchitecture(
            f"rope type {kind!r} in config.json is not supported yet (plain RoPE only)")
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def common_fields(hf: dict) -> dict:
    """Fields every llama-style config spells the same way."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=hf.get("hidden_act", "silu"),
    )


def num_experts(hf: dict) -> int:
    """Hub configs say num_experts (Qwen, OLMoE) or num_local_experts (Mixtral); transformers v5 may
    write either for any of them."""
    n = hf.get("num_experts") or hf.get("num_local_experts")
    if not n:
        raise UnsupportedArchitecture("config.json names no experts (num_experts / num_local_experts)")
    return int(n)


def sparse_layers(hf: dict) -> tuple[int, ...]:
    """MoE layers of the Qwen families: every decoder_sparse_step-th, minus mlp_only_layers."""
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(hf["num_hidden_layers"])
                 if i not in dense and (i + 1) % step == 0)
