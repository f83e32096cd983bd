"""The decoder's small cpu ops as single numba calls: RMSNorm of rows, one decode token's attention
(q/k RMSNorm, rotary embedding, KV cache write, grouped-query softmax attention), a prompt chunk's
causal attention, and the router's top-k. In numpy they are dozens of small ops per layer, and
numpy's matmul would start BLAS threads that fight the kernels' threads for the cores (prefill at
half speed on 2 cores)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

QK_NORMS = {"none": 0, "head": 1, "full": 2}  # ModelConfig.qk_norm -> the kernel's code


@njit(inline='always')
def _rms(x, w, eps):
    """x * w / sqrt(mean(x^2) + eps) in place (x, w float32 of one length)."""
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(s / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        x[i] = x[i] * r * w[i]


@njit(inline='always')
def _rope(x, cos, sin):
    """Rotate-half rotary embedding of one head x [hd] in place."""
    half = x.shape[0] // 2
    for i in range(half):
        a, b = x[i], x[i + half]
        x[i] = a * cos[i] - b * sin[i]
        x[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(cache=True, nogil=True)
def rms_rows(x, w, eps, out):
    """out = x * w / sqrt(mean(x^2) + eps) per row of x [T, D] (the decoder's RMSNorm on the cpu:
    F.rms_norm's time per decode token is mostly dispatch)."""
    out[:] = x
    for t in range(x.shape[0]):
        _rms(out[t], w, eps)


@njit(cache=True, nogil=True)
def add_rms_rows(h, delta, w, eps, out):
    """h += delta, then out = rms_rows of h (the residual add before each RMSNorm of the decoder)."""
    h += delta
    rms_rows(h, w, eps, out)


@njit(cache=True, parallel=True, nogil=True)
def decode_attention(q, k, v, q_norm, k_norm, norm, eps, cos, sin, keys, values, pos, out):
    """out [H, hd] = softmax(q_h . K_g / sqrt(hd)) V_g over positions 0..pos for one token at `pos`,
    g = h // (H / KV), after q [H, hd] and k [KV, hd] are normed (norm 1: per head with weights [hd],
    2: whole projection with weights [H*hd] / [KV*hd]) and rotated (cos, sin [hd] of pos); k and v
    [KV, hd] are written to keys / values [S, KV, hd] at pos first. q and k are changed in place."""
    H, hd = q.shape
    KV = k.shape[0]
    if norm == 2:
        _rms(q.reshape(H * hd), q_norm, eps)
        _rms(k.reshape(KV * hd), k_norm, eps)
    for h in range(H):
        if norm == 1:
            _rms(q[h], q_norm, eps)
        _rope(q[h], cos, sin)
    for g in range(KV):
        if norm == 1:
            _rms(k[g], k_norm, eps)
        _rope(k[g], cos, sin)
        keys[pos, g] = k[g]
        values[pos, g] = v[g]
    scale = np.float32(1.0 / np.sqrt(hd))
    group = H // KV
    for h in prange(H):
        _attend(q[h], keys, values, h // group, pos + 1, scale, out[h])


@njit(cache=True, parallel=True, nogil=True)
def prefill_attention(q, keys, values, pos0, out):
    """out [T, H, hd] = causal softmax attention of the rotated queries q [T, H, hd] at positions
    pos0..pos0+T-1 over keys / values [S, KV, hd], filled up to pos0+T; head h reads KV head
    h // (H / KV). One (token, head) pair per job: no [H, T, S] score tensor."""
    T, H, hd = q.shape
    group = H // keys.shape[1]
    scale = np.float32(1.0 / np.sqrt(hd))
    for job in prange(T * H):
        t, h = job // H, job % H
        _attend(q[t, h], keys, values, h // group, pos0 + t + 1, scale, out[t, h])


@njit(inline='always')
def _attend(q, keys, values, g, n, scale, out):
    """out [hd] = softmax(q . keys[:n, g] * scale) @ values[:n, g]."""
    hd = q.shape[0]
    score = np.empty(n, np.float32)
    top = np.float32(-np.inf)
    for s in range(n):
        d = np.float32(0.0)
        for i in range(hd):
            d += q[i] * keys[s, g, i]
        score[s] = d * scale
        top = max(top, score[s])
    total = np.float32(0.0)
    for s in range(n):
        score[s] = np.exp(score[s] - top)
        total += score[s]
    for i in range(hd):
        out[i] = 0.0
    for s in range(n):
        p = score[s] / total
        for i in range(hd):
            out[i] += p * values[s, g, i]


@njit(fastmath=True)
def _dot(a, b):
    """sum(a * b) of two float32 vectors (fastmath: LLVM may reorder the sum, so it vectorises)."""
    d = np.float32(0.0)
    for i in range(a.shape[0]):
        d += a[i] * b[i]
    return d


@njit(cache=True, nogil=True)
def route_token(x, router, renorm, weights, experts):
    """Softmax-then-top-k gate of one token: x [D], router [E, D] float32 -> the k = len(weights) largest
    probabilities, descending (ties: the lower expert first), and their experts; renormalised to sum 1
    when renorm. One call where torch takes three (linear, softmax, topk)."""
    E = router.shape[0]
    p = np.empty(E, np.float32)
    for e in range(E):
        p[e] = _dot(router[e], x)
    p = np.exp(p - p.max())
    p /= p.sum()
    taken = np.zeros(E, np.bool_)
    for j in range(weights.shape[0]):
        best = -1
        for e in range(E):
            if not taken[e] and (best < 0 or p[e] > p[best]):
                best = e
        taken[best] = True
        experts[j], weights[j] = best, p[best]
    if renorm:
        weights /= weights.sum()


@njit(cache=True, nogil=True)
def route_rows(x, router, renorm, weights, experts):
    """route_token of each row of x [T, D] into weights / experts [T, K]."""
    for t in range(x.shape[0]):
        route_token(x[t], router, renorm, weights[t], experts[t])
