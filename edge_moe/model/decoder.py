"""One config-driven MoE decoder: embedding, attention blocks, MoE or dense FFN, final norm, LM head."""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import numpy as np

from edge_moe.config import ModelConfig
from edge_moe.errors import UnsupportedArchitecture


class Experts(Protocol):
    """Computes sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for one MoE layer; `call` is what
    the forward's caller passed (the request's knobs and counters), opaque to the decoder."""

    def __call__(self, layer: int, x, weights, experts, call): ...


class Decoder:
    """Forward pass over dense weights `w` (internal names) with the layers of `ops`: model.host_layers
    (numpy arrays, the cpu) or model.torch_layers (tensors, cuda); routed experts come from `experts`."""

    def __init__(self, cfg: ModelConfig, w: dict, experts: Experts, ops: ModuleType):
        if cfg.hidden_act != "silu":
            raise UnsupportedArchitecture(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        self.cfg, self.w, self.experts, self.ops = cfg, w, experts, ops
        self.rope = ops.Rope(cfg.head_dim, cfg.rope_theta)
        self.lm_head = w["embed"] if cfg.tie_word_embeddings else w["lm_head"]

    def new_cache(self, max_tokens: int):
        return self.ops.KVCache(self.cfg, max_tokens, device=self.ops.DEVICE)

    def ffn(self, layer: int, x, call):
        p, w, cfg, ops = f"layers.{layer}", self.w, self.cfg, self.ops
        if layer not in cfg.moe_layers:
            return ops.swiglu(x, w[f"{p}.mlp_gate_up"], w[f"{p}.mlp_down"])
        weights, experts = ops.route(x, w[f"{p}.router"], cfg)  # [T, K]
        out = self.experts(layer, x, weights, experts, call)
        if cfg.shared_expert_intermediate_size:
            shared = ops.swiglu(x, w[f"{p}.shared_gate_up"], w[f"{p}.shared_down"])
            if cfg.shared_expert_gate:  # Qwen2-MoE: sigmoid gate per token
                shared = ops.sigmoid(ops.linear(x, w[f"{p}.shared_gate"])) * shared
            out = out + shared
        return out

    def forward(self, ids, cache, call=None, all_logits: bool = False) -> np.ndarray:
        """Run token ids [T] (a list or array) after the cache's tokens; float32 logits [T, V], or of the
        last token [1, V], as a numpy array. `call` goes to the experts of every MoE layer."""
        return self.forward_many([(ids, cache)], call, all_logits)

    def forward_many(self, seqs: list, call=None, all_logits: bool = False) -> np.ndarray:
        """One forward over several sequences [(ids, cache), ...], each continuing its own KV cache: the
        projections and the experts run on the rows of all of them at once. Logits of every row
        [sum T, V] (all_logits), else of each sequence's last token [len(seqs), V]."""
        cfg, w, ops = self.cfg, self.w, self.ops
        spans, end = [], 0
        for ids, cache in seqs:
            if cache.length + len(ids) > cache.capacity:
                raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.length + len(ids)} needed")
            spans.append((cache, end, end + len(ids)))
            end += len(ids)
        eps = cfg.rms_norm_eps
        with ops.forward_context():
            h = ops.embed(w["embed"], [t for ids, _ in seqs for t in ids])  # [T, D], the residual stream
            x = ops.rms_norm(h, w["layers.0.attn_norm"], eps)  # its RMSNorm before each block
            for i in range(cfg.num_layers):
                attended = ops.attention(x, w, cfg, i, spans, self.rope)
                h, x = ops.add_rms_norm(h, attended, w[f"layers.{i}.ffn_norm"], eps)
                after = w[f"layers.{i + 1}.attn_norm"] if i + 1 < cfg.num_layers else w["final_norm"]
                h, x = ops.add_rms_norm(h, self.ffn(i, x, call), after, eps)
            for cache, start, stop in spans:
                cache.length += stop - start
            last = x if all_logits else x[[stop - 1 for _, _, stop in spans]]
            return ops.to_host(ops.linear(last, self.lm_head))
