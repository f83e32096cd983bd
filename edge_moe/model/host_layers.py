"""The decoder's layers on the cpu as numpy arrays and numba kernels (the cpu run path imports no torch):
RMSNorm, rotary embeddings, grouped-query attention with a KV cache, router, SwiGLU."""

from __future__ import annotations

import contextlib

import numpy as np

from edge_moe.config import ModelConfig
from edge_moe.kernels.attention import (
    QK_NORMS,
    add_rms_rows,
    decode_attention,
    prefill_attention,
    rms_rows,
    route_rows,
)
from edge_moe.model.packed import PackedLinear

DEVICE = "cpu"
_NONE = np.zeros(0, np.float32)


def forward_context():
    return contextlib.nullcontext()


def to_host(a: np.ndarray) -> np.ndarray:
    return a


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, float32, in one numba call."""
    rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    out = np.empty(rows.shape, np.float32)
    rms_rows(rows, weight, np.float32(eps), out)
    return out.reshape(x.shape)


def add_rms_norm(h: np.ndarray, delta: np.ndarray, weight: np.ndarray,
                 eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(h + delta, rms_norm(h + delta)): the residual add (into h, the decoder's own residual stream)
    and the next RMSNorm, in one numba call."""
    out = np.empty(h.shape, np.float32)
    add_rms_rows(h, np.ascontiguousarray(delta, np.float32), weight, np.float32(eps), out)
    return h, out


def linear(x: np.ndarray, w: np.ndarray | PackedLinear, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T (+ bias), float32."""
    y = w(x) if isinstance(w, PackedLinear) else x @ w.T
    return y if bias is None else y + bias


def embed(table: np.ndarray | PackedLinear, ids) -> np.ndarray:
    """Rows of the embedding table as float32 [T, D]."""
    ids = np.asarray(ids, np.int64)
    return table.rows(ids) if isinstance(table, PackedLinear) else table[ids]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Rope:
    """Rotary embeddings, rotate-half form as in transformers' llama-style models; cos and sin of
    each position are computed once, in tables [S, hd] that grow by doubling."""

    def __init__(self, head_dim: int, theta: float):
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
        self.inv_freq = (1.0 / theta ** exponents).astype(np.float32)
        self.cos = self.sin = np.empty((0, head_dim), np.float32)

    def tables(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [S >= end, hd]."""
        if self.cos.shape[0] < end:
            positions = np.arange(max(end, 2 * self.cos.shape[0]), dtype=np.float32)
            freqs = positions[:, None] * self.inv_freq  # [S, hd/2]
            emb = np.concatenate([freqs, freqs], axis=-1)
            self.cos, self.sin = np.cos(emb), np.sin(emb)
        return self.cos, self.sin

    def __call__(self, x: np.ndarray, pos0: int) -> np.ndarray:
        t, half = x.shape[0], x.shape[-1] // 2  # x [T, H, hd]
        cos, sin = (a[pos0:pos0 + t, None] for a in self.tables(pos0 + t))
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin


def kv_bytes(cfg: ModelConfig, max_tokens: int, itemsize: int = 4) -> int:
    """Bytes a KV cache of `max_tokens` tokens takes (keys and values of every layer)."""
    return 2 * cfg.num_layers * max_tokens * cfg.num_kv_heads * cfg.head_dim * itemsize


class KVCache:
    """Preallocated float32 keys and values per layer: [L, S, KV, hd]; `length` tokens are filled.
    Zeroed pages are committed as they are written."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, device: str = DEVICE):
        shape = (cfg.num_layers, max_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def attention(x: np.ndarray, w: dict, cfg: ModelConfig, layer: int, spans: list, rope: Rope) -> np.ndarray:
    """Causal GQA; x [T, D] holds the rows of one or more sequences, spans [(cache, start, end)]: rows
    start..end are the tokens at positions cache.length.. of the sequence whose KV cache is `cache`.
    The projections run over every row at once, the attention over each sequence's own cache."""
    p = f"layers.{layer}"
    qkv = linear(x, w[f"{p}.qkv"], w.get(f"{p}.qkv_bias"))  # q, k, v in one matmul (weights.qkv_part)
    heads = [(_decode_attention if end - start == 1 else _prefill_attention)(qkv[start:end], w, cfg, layer,
                                                                             cache, rope)
             for cache, start, end in spans]
    return linear(heads[0] if len(heads) == 1 else np.concatenate(heads), w[f"{p}.o"])


def _split(qkv: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [T, H, hd], k and v [T, KV, hd] of the fused projection [T, (H + 2 KV) hd]."""
    t, hd, H, KV = qkv.shape[0], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q, k, v = np.split(qkv, [H * hd, (H + KV) * hd], axis=1)
    return q.reshape(t, H, hd), k.reshape(t, KV, hd), v.reshape(t, KV, hd)


def _prefill_attention(qkv: np.ndarray, w: dict, cfg: ModelConfig, layer: int, cache: KVCache,
                       rope: Rope) -> np.ndarray:
    """Several tokens: q/k norms and rotary embedding in numpy, the cache write, then the causal
    attention in one numba call (kernels.attention.prefill_attention); [T, H*hd]."""
    t, pos0, p, eps = qkv.shape[0], cache.length, f"layers.{layer}", cfg.rms_norm_eps
    q, k, v = _split(qkv, cfg)
    if cfg.qk_norm != "none":  # "full" normalizes the whole projection (OLMoE), "head" each head (Qwen3)
        flat = cfg.qk_norm == "full"
        q = rms_norm(q.reshape(t, -1) if flat else q, w[f"{p}.q_norm"], eps).reshape(q.shape)
        k = rms_norm(k.reshape(t, -1) if flat else k, w[f"{p}.k_norm"], eps).reshape(k.shape)
    q, k = rope(q, pos0), rope(k, pos0)
    cache.k[layer, pos0:pos0 + t], cache.v[layer, pos0:pos0 + t] = k, v
    out = np.empty(q.shape, np.float32)
    prefill_attention(np.ascontiguousarray(q, np.float32), cache.k[layer], cache.v[layer], pos0, out)
    return out.reshape(t, -1)


def _decode_attention(qkv: np.ndarray, w: dict, cfg: ModelConfig, layer: int, cache: KVCache,
                      rope: Rope) -> np.ndarray:
    """One token: every step after the projection in one numba call (kernels.attention.decode_attention);
    [1, H*hd]."""
    pos, p = cache.length, f"layers.{layer}"
    q, k, v = (a[0] for a in _split(qkv, cfg))
    cos, sin = rope.tables(pos + 1)
    norm = QK_NORMS[cfg.qk_norm]
    q_norm, k_norm = (w[f"{p}.q_norm"], w[f"{p}.k_norm"]) if norm else (_NONE, _NONE)
    out = np.empty((cfg.num_heads, cfg.head_dim), np.float32)
    decode_attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), q_norm, k_norm,
                     norm, np.float32(cfg.rms_norm_eps), cos[pos], sin[pos], cache.k[layer], cache.v[layer],
                     pos, out)
    return out.reshape(1, -1)


def route(x: np.ndarray, router: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Softmax-then-top-k gate: (weights [T, K] float32, experts [T, K] int64), descending, ties to the
    lower expert; one numba call (kernels.attention.route_rows)."""
    shape = (x.shape[0], cfg.top_k)
    weights, experts = np.empty(shape, np.float32), np.empty(shape, np.int64)
    route_rows(np.ascontiguousarray(x, np.float32), router, cfg.norm_topk_prob, weights, experts)
    return weights, experts


def swiglu(x: np.ndarray, gate_up, down) -> np.ndarray:
    """Dense SwiGLU MLP with fused gate_up [2I, D] and down [D, I]."""
    gate, up = np.split(linear(x, gate_up), 2, axis=-1)
    return linear(gate * sigmoid(gate) * up, down)
