"""One config-driven MoE decoder: embedding, attention blocks, MoE or dense FFN, final norm, LM head."""

from __future__ import annotations

from typing import Protocol

import torch

from edge_moe.config import ModelConfig
from edge_moe.errors import UnsupportedArchitecture
from edge_moe.model.layers import KVCache, Rope, add_rms_norm, attention, embed, linear, rms_norm, route, swiglu


class Experts(Protocol):
    """Computes sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for one MoE layer; `call` is what
    the forward's caller passed (the request's knobs and counters), opaque to the decoder."""

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                 call) -> torch.Tensor: ...


class Decoder:
    """Forward pass over dense weights `w` (internal names); routed experts come from `experts`."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], experts: Experts):
        if cfg.hidden_act != "silu":
            raise UnsupportedArchitecture(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        self.cfg, self.w, self.experts = cfg, w, experts
        self.rope = Rope(cfg.head_dim, cfg.rope_theta)
        self.lm_head = w["embed"] if cfg.tie_word_embeddings else w["lm_head"]

    @property
    def device(self) -> torch.device:
        return self.w["final_norm"].device

    def new_cache(self, max_tokens: int) -> KVCache:
        return KVCache(self.cfg, max_tokens, device=self.device)

    def ffn(self, layer: int, x: torch.Tensor, call) -> torch.Tensor:
        p, w, cfg = f"layers.{layer}", self.w, self.cfg
        if layer not in cfg.moe_layers:
            return swiglu(x, w[f"{p}.mlp_gate_up"], w[f"{p}.mlp_down"])
        weights, experts = route(x, w[f"{p}.router"], cfg)  # [T, K]
        out = self.experts(layer, x, weights, experts, call)
        if cfg.shared_expert_intermediate_size:
            shared = swiglu(x, w[f"{p}.shared_gate_up"], w[f"{p}.shared_down"])
            if cfg.shared_expert_gate:  # Qwen2-MoE: sigmoid gate per token
                shared = torch.sigmoid(linear(x, w[f"{p}.shared_gate"])) * shared
            out = out + shared
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, call=None, all_logits: bool = False) -> torch.Tensor:
        """Run tokens ids [T] after the cache's tokens; logits [T, V] or of the last token [1, V]. `call`
        goes to the experts of every MoE layer."""
        cfg, w = self.cfg, self.w
        if cache.length + len(ids) > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.length + len(ids)} needed")
        eps = cfg.rms_norm_eps
        h = embed(w["embed"], ids.to(self.device))  # [T, D], the residual stream
        x = rms_norm(h, w["layers.0.attn_norm"], eps)  # its RMSNorm before each block
        for i in range(cfg.num_layers):
            h, x = add_rms_norm(h, attention(x, w, cfg, i, cache, self.rope), w[f"layers.{i}.ffn_norm"], eps)
            after = w[f"layers.{i + 1}.attn_norm"] if i + 1 < cfg.num_layers else w["final_norm"]
            h, x = add_rms_norm(h, self.ffn(i, x, call), after, eps)
        cache.length += len(ids)
        return linear(x if all_logits else x[-1:], self.lm_head)
