"""Internal tensor names and shapes the decoder needs; adapters map Hugging Face names onto these."""

from __future__ import annotations

import re

from edge_moe.config import ModelConfig


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """gate_up [2I, D] (gate rows, then up rows) and down [D, I]."""
    i, d = cfg.moe_intermediate_size, cfg.hidden_size
    return {"gate_up": (2 * i, d), "down": (d, i)}


def _attention_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {f"{p}.q": (q, d), f"{p}.k": (kv, d), f"{p}.v": (kv, d), f"{p}.o": (d, q)}
    if cfg.attention_bias:
        shapes.update({f"{p}.q_bias": (q,), f"{p}.k_bias": (kv,), f"{p}.v_bias": (kv,)})
    if cfg.qk_norm == "head":
        shapes.update({f"{p}.q_norm": (hd,), f"{p}.k_norm": (hd,)})
    elif cfg.qk_norm == "full":
        shapes.update({f"{p}.q_norm": (q,), f"{p}.k_norm": (kv,)})
    return shapes


def _ffn_shapes(cfg: ModelConfig, layer: int, p: str) -> dict[str, tuple[int, ...]]:
    d = cfg.hidden_size
    if layer not in cfg.moe_layers:
        return {f"{p}.mlp_gate_up": (2 * cfg.intermediate_size, d),
                f"{p}.mlp_down": (d, cfg.intermediate_size)}
    shapes = {f"{p}.router": (cfg.num_experts, d)}
    if cfg.shared_expert_intermediate_size:
        si = cfg.shared_expert_intermediate_size
        shapes.update({f"{p}.shared_gate_up": (2 * si, d), f"{p}.shared_down": (d, si)})
    if cfg.shared_expert_gate:
        shapes[f"{p}.shared_gate"] = (1, d)
    return shapes


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor: name -> shape, in file order."""
    d = cfg.hidden_size
    shapes = {"embed": (cfg.vocab_size, d), "final_norm": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        shapes.update({f"{p}.attn_norm": (d,), f"{p}.ffn_norm": (d,)})
        shapes.update(_attention_shapes(cfg, p))
        shapes.update(_ffn_shapes(cfg, i, p))
    return shapes


def qkv_part(name: str) -> tuple[str, int] | None:
    """(fused name, index 0-2) of a q, k or v projection or bias, which load as one `qkv` tensor, rows
    q then k then v (one matmul per layer instead of three); None for other tensors."""
    m = re.fullmatch(r"(layers\.\d+)\.([qkv])(_bias)?", name)
    return (f"{m[1]}.qkv{m[3] or ''}", "qkv".index(m[2])) if m else None
