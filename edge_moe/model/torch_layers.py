"""The decoder's layers as torch ops, for CUDA (the cpu runs model.host_layers): RMSNorm, rotary embeddings,
grouped-query attention with a KV cache, router, SwiGLU. Same names and contracts as host_layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_moe.config import ModelConfig
from edge_moe.model import host_layers

DEVICE = "cuda"


def forward_context():
    return torch.inference_mode()


def to_host(logits: torch.Tensor):
    """Logits as a float32 numpy array (sampling runs on the host)."""
    return logits.float().cpu().numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in float32."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)): the residual add and the next RMSNorm."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) in the weights' dtype, returned as float32 (the residual stream's dtype)."""
    y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
    return y.float()


def embed(table: torch.Tensor, ids) -> torch.Tensor:
    """Rows of the embedding table as float32 [T, D]."""
    return table[torch.as_tensor(ids, device=table.device)].float()


class Rope:
    """Rotary embeddings, rotate-half form as in transformers' llama-style models; cos and sin of
    each position are computed once, in tables that grow by doubling."""

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.cos = self.sin = torch.empty(0, 1, head_dim)

    def tables(self, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [S >= end, 1, hd] on device."""
        if self.cos.shape[0] < end or self.cos.device != torch.device(device):
            positions = torch.arange(max(end, 2 * self.cos.shape[0]), dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq  # [S, hd/2]
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
            self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)
        return self.cos, self.sin

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        t = x.shape[0]  # x [T, H, hd]
        cos, sin = self.tables(pos0 + t, x.device)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[pos0:pos0 + t] + rotated * sin[pos0:pos0 + t]


class KVCache(host_layers.KVCache):
    """host_layers.KVCache as tensors on a device."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, device: str = DEVICE, dtype=torch.float32):
        shape = (cfg.num_layers, max_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0


def attention(x: torch.Tensor, w: dict, cfg: ModelConfig, layer: int, spans: list, rope: Rope) -> torch.Tensor:
    """Causal GQA over each sequence's cache (host_layers.attention's contract)."""
    p = f"layers.{layer}"
    qkv = linear(x, w[f"{p}.qkv"], w.get(f"{p}.qkv_bias"))  # q, k, v in one matmul (weights.qkv_part)
    heads = [_attend(qkv[start:end], w, cfg, layer, cache, rope) for cache, start, end in spans]
    return linear(heads[0] if len(heads) == 1 else torch.cat(heads), w[f"{p}.o"])


def _attend(qkv: torch.Tensor, w: dict, cfg: ModelConfig, layer: int, cache: KVCache,
            rope: Rope) -> torch.Tensor:
    """One sequence's rows of the fused projection [T, (H + 2 KV) hd] -> its attention heads [T, H*hd]."""
    t, pos0, p = qkv.shape[0], cache.length, f"layers.{layer}"
    q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2], dim=-1)
    if cfg.qk_norm == "full":  # OLMoE normalizes the whole projection
        q, k = rms_norm(q, w[f"{p}.q_norm"], cfg.rms_norm_eps), rms_norm(k, w[f"{p}.k_norm"], cfg.rms_norm_eps)
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3 normalizes each head
        q, k = rms_norm(q, w[f"{p}.q_norm"], cfg.rms_norm_eps), rms_norm(k, w[f"{p}.k_norm"], cfg.rms_norm_eps)
    q, k = rope(q, pos0), rope(k, pos0)
    cache.k[layer, pos0:pos0 + t] = k
    cache.v[layer, pos0:pos0 + t] = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    keys, values = cache.k[layer, :pos0 + t], cache.v[layer, :pos0 + t]  # [S, KV, hd]
    dev = qkv.device
    mask = None if t == 1 else (  # one new token sees every cached one
        torch.arange(pos0 + t, device=dev)[None, :] <= torch.arange(pos0, pos0 + t, device=dev)[:, None])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None].float(), values.transpose(0, 1)[None].float(),
        attn_mask=mask, enable_gqa=cfg.num_heads != cfg.num_kv_heads)  # [1, H, T, hd]
    return out[0].transpose(0, 1).reshape(t, -1)


def route(x: torch.Tensor, router: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-then-top-k gate: (weights [T, K] float32, experts [T, K] int64)."""
    probs = torch.softmax(linear(x, router), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP with fused gate_up [2I, D] and down [D, I]."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)
