"""Shared decoder layers: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, router."""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from edge_moe.config import ModelConfig
from edge_moe.kernels.attention import QK_NORMS, add_rms_rows, decode_attention, rms_rows, route_token
from edge_moe.model.packed import PackedLinear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in float32, one fused op (per-op dispatch is most of a
    decode step's non-kernel time): on the cpu one numba call for rows [T, D]."""
    if _cpu_rows(x):
        out = np.empty(x.shape, np.float32)
        rms_rows(x.numpy(), _as_f32(weight), np.float32(eps), out)
        return torch.from_numpy(out)
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)): the residual add and the next RMSNorm; on the cpu one numba call
    that adds into h in place (the decoder's own residual stream)."""
    if _cpu_rows(h) and _cpu_rows(delta) and h.shape == delta.shape:
        out = np.empty(h.shape, np.float32)
        add_rms_rows(h.numpy(), delta.numpy(), _as_f32(weight), np.float32(eps), out)
        return h, torch.from_numpy(out)
    h = h + delta
    return h, rms_norm(h, weight, eps)


def _cpu_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()


def linear(x: torch.Tensor, w: torch.Tensor | PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) in the weights' dtype, returned as float32 (the residual stream's dtype)."""
    if isinstance(w, PackedLinear):
        y = w(x)
        return y if bias is None else y + bias.float()
    y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
    return y.float()


def embed(table: torch.Tensor | PackedLinear, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the embedding table as float32 [T, D]."""
    return table.rows(ids) if isinstance(table, PackedLinear) else table[ids].float()


class Rope:
    """Rotary embeddings, rotate-half form as in transformers' llama-style models; cos and sin of
    each position are computed once, in tables that grow by doubling."""

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.cos = self.sin = torch.empty(0, 1, head_dim)
        self.host = (np.empty((0, head_dim), np.float32),) * 2  # cpu tables as numpy [S, hd] (decode)

    def host_tables(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [S >= end, hd] as cpu numpy arrays."""
        if self.host[0].shape[0] < end:
            cos, sin = self.tables(end, "cpu")
            self.host = (cos[:, 0].numpy(), sin[:, 0].numpy())
        return self.host

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


class KVCache:
    """Preallocated keys and values per layer: [L, S, KV, hd]; `length` tokens are filled."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_layers, max_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.host = (self.k.numpy(), self.v.numpy()) if self.k.device.type == "cpu" else None  # views
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(cfg: ModelConfig, max_tokens: int, itemsize: int = 4) -> int:
        """Bytes a cache of `max_tokens` tokens takes (keys and values of every layer)."""
        return 2 * cfg.num_layers * max_tokens * cfg.num_kv_heads * cfg.head_dim * itemsize


def attention(x: torch.Tensor, w: dict, cfg: ModelConfig, layer: int, cache: KVCache,
              rope: Rope) -> torch.Tensor:
    """Causal GQA over the cache; x [T, D] are the tokens at positions cache.length..+T."""
    t, pos0, p = x.shape[0], cache.length, f"layers.{layer}"
    qkv = linear(x, w[f"{p}.qkv"], w.get(f"{p}.qkv_bias"))  # q, k, v in one matmul (weights.qkv_part)
    if t == 1 and x.device.type == "cpu" and qkv.dtype == torch.float32:
        return linear(_decode_attention(qkv, w, cfg, layer, cache, rope), w[f"{p}.o"])
    q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2], dim=-1)
    if cfg.qk_norm == "full":  # OLMoE normalizes the whole projection
        q, k = rms_norm(q, w[f"{p}.q_norm"], cfg.rms_norm_eps), rms_norm(k, w[f"{p}.k_norm"], cfg.rms_norm_eps)
    q = q.view(t, cfg.num_heads, cfg.head_dim)
    k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3 normalizes each head
        q, k = rms_norm(q, w[f"{p}.q_norm"], cfg.rms_norm_eps), rms_norm(k, w[f"{p}.k_norm"], cfg.rms_norm_eps)
    q, k = rope(q, pos0), rope(k, pos0)
    cache.k[layer, pos0:pos0 + t] = k
    cache.v[layer, pos0:pos0 + t] = v.view(t, cfg.num_kv_heads, cfg.head_dim)
    keys, values = cache.k[layer, :pos0 + t], cache.v[layer, :pos0 + t]  # [S, KV, hd]
    dev = x.device
    mask = None if t == 1 else (  # one new token sees every cached one
        torch.arange(pos0 + t, device=dev)[None, :] <= torch.arange(pos0, pos0 + t, device=dev)[:, None])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None].float(), values.transpose(0, 1)[None].float(),
        attn_mask=mask, enable_gqa=cfg.num_heads != cfg.num_kv_heads)  # [1, H, T, hd]
    return linear(out[0].transpose(0, 1).reshape(t, -1), w[f"{p}.o"])


def _decode_attention(qkv: torch.Tensor, w: dict, cfg: ModelConfig, layer: int, cache: KVCache,
                      rope: Rope) -> torch.Tensor:
    """attention's steps after the projection qkv [1, (H + 2 KV) hd] for one token on the cpu, in one
    numba call (kernels.attention.decode_attention) on numpy views; [1, H*hd]."""
    pos, hd, H, KV = cache.length, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    row = qkv.numpy()[0]
    q, k, v = (row[:H * hd].reshape(H, hd), row[H * hd:(H + KV) * hd].reshape(KV, hd),
               row[(H + KV) * hd:].reshape(KV, hd))
    cos, sin = rope.host_tables(pos + 1)
    norm = QK_NORMS[cfg.qk_norm]
    p = f"layers.{layer}"
    q_norm, k_norm = (_as_f32(w[f"{p}.q_norm"]), _as_f32(w[f"{p}.k_norm"])) if norm else (_NONE, _NONE)
    out = np.empty((H, hd), np.float32)
    keys, values = cache.host
    decode_attention(q, k, v, q_norm, k_norm, norm, np.float32(cfg.rms_norm_eps), cos[pos], sin[pos],
                     keys[layer], values[layer], pos, out)
    return torch.from_numpy(out.reshape(1, -1))


_NONE = np.zeros(0, np.float32)
_F32: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(weight tensor) -> (it, its float32 numpy copy)


def _as_f32(t: torch.Tensor) -> np.ndarray:
    hit = _F32.get(id(t))
    if hit is None or hit[0]() is not t:
        hit = _F32[id(t)] = (weakref.ref(t), t.float().numpy())
    return hit[1]


def route(x: torch.Tensor, router: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-then-top-k gate: (weights [T, K] float32, experts [T, K] int64); one token on the cpu in
    one numba call (kernels.attention.route_token)."""
    if x.shape[0] == 1 and x.device.type == "cpu" and router.dtype == x.dtype == torch.float32:
        weights, experts = np.empty((1, cfg.top_k), np.float32), np.empty((1, cfg.top_k), np.int64)
        route_token(x.numpy()[0], router.numpy(), cfg.norm_topk_prob, weights[0], experts[0])
        return torch.from_numpy(weights), torch.from_numpy(experts)
    probs = torch.softmax(linear(x, router), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP with fused gate_up [2I, D] and down [D, I]."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)
