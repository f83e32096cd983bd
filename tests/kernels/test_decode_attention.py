"""kernels.attention against torch: decode_attention (RMSNorm, rotate-half rope, SDPA with GQA),
prefill_attention (causal SDPA with GQA after cached tokens), route_token and route_rows (softmax,
top-k), add_rms_rows (residual add, RMSNorm)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_moe.kernels.attention import (
    QK_NORMS,
    add_rms_rows,
    decode_attention,
    prefill_attention,
    route_rows,
    route_token,
)
from edge_moe.model.host_layers import Rope
from tests.tolerances import FLOAT32_OP_ATOL, FLOAT32_OP_REL


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("heads, kv", [(8, 8), (8, 2), (6, 1)])
@pytest.mark.parametrize("qk_norm", list(QK_NORMS))
@pytest.mark.parametrize("pos", [0, 1, 37])
def test_decode_attention_matches_torch(heads, kv, qk_norm, pos):
    hd, eps = 16, 1e-5
    g = torch.Generator().manual_seed(pos * 31 + heads + kv)
    q, k, v = (torch.randn(n, hd, generator=g) for n in (heads, kv, kv))
    keys, values = torch.randn(40, kv, hd, generator=g), torch.randn(40, kv, hd, generator=g)
    width = {"none": 0, "head": hd, "full": None}[qk_norm]
    qn = torch.rand(heads * hd if width is None else width, generator=g) + 0.5
    kn = torch.rand(kv * hd if width is None else width, generator=g) + 0.5
    cos, sin = (torch.from_numpy(t[pos]) for t in Rope(hd, 10000.0).tables(pos + 1))

    rq, rk = q.clone(), k.clone()  # the torch form of model.layers.attention
    if qk_norm == "full":
        rq = F.rms_norm(rq.reshape(-1), qn.shape, qn, eps).reshape(heads, hd)
        rk = F.rms_norm(rk.reshape(-1), kn.shape, kn, eps).reshape(kv, hd)
    elif qk_norm == "head":
        rq, rk = F.rms_norm(rq, qn.shape, qn, eps), F.rms_norm(rk, kn.shape, kn, eps)
    rq, rk = rotate(rq, cos, sin), rotate(rk, cos, sin)
    rkeys, rvalues = keys.clone(), values.clone()
    rkeys[pos], rvalues[pos] = rk, v
    seen = [c[:pos + 1].transpose(0, 1)[None] for c in (rkeys, rvalues)]
    ref = F.scaled_dot_product_attention(rq[:, None][None], *seen, enable_gqa=heads != kv)[0, :, 0]

    out = np.empty((heads, hd), np.float32)
    kc, vc = keys.numpy().copy(), values.numpy().copy()
    decode_attention(q.numpy().copy(), k.numpy().copy(), v.numpy().copy(), qn.numpy(), kn.numpy(),
                     QK_NORMS[qk_norm], np.float32(eps), cos.numpy(), sin.numpy(), kc, vc, pos, out)
    np.testing.assert_allclose(out, ref.numpy(), rtol=FLOAT32_OP_REL, atol=FLOAT32_OP_REL)
    # the cache holds the rotated key
    np.testing.assert_allclose(kc[pos], rk.numpy(), rtol=FLOAT32_OP_REL, atol=FLOAT32_OP_REL)
    np.testing.assert_array_equal(vc[pos], v.numpy())
    np.testing.assert_array_equal(np.delete(kc, pos, 0), np.delete(keys.numpy(), pos, 0))


def test_rms_rows_matches_torch():
    from edge_moe.kernels.attention import rms_rows

    x, w = torch.randn(5, 300), torch.rand(300) + 0.5
    out = np.empty((5, 300), np.float32)
    rms_rows(x.numpy(), w.numpy(), np.float32(1e-6), out)
    np.testing.assert_allclose(out, F.rms_norm(x, w.shape, w, 1e-6).numpy(), rtol=FLOAT32_OP_REL,
                               atol=FLOAT32_OP_ATOL)


@pytest.mark.parametrize("experts, k", [(64, 8), (8, 2), (60, 4), (4, 4)])
@pytest.mark.parametrize("renorm", [False, True])
def test_route_token_matches_torch_softmax_topk(experts, k, renorm):
    g = torch.Generator().manual_seed(experts * 7 + k)
    for _ in range(5):
        x, router = torch.randn(96, generator=g), torch.randn(experts, 96, generator=g)
        probs = torch.softmax(router @ x, -1)
        want_w, want_e = torch.topk(probs, k)
        if renorm:
            want_w = want_w / want_w.sum()
        w, e = np.empty(k, np.float32), np.empty(k, np.int64)
        route_token(x.numpy(), router.numpy(), renorm, w, e)
        assert e.tolist() == want_e.tolist()
        np.testing.assert_allclose(w, want_w.numpy(), rtol=FLOAT32_OP_REL)


@pytest.mark.parametrize("rows", [1, 3])
def test_add_rms_rows_adds_in_place_then_norms(rows):
    g = torch.Generator().manual_seed(rows)
    h, delta = torch.randn(rows, 64, generator=g), torch.randn(rows, 64, generator=g)
    weight = torch.rand(64, generator=g) + 0.5
    want_h = h + delta
    want = F.rms_norm(want_h, (64,), weight, 1e-6)
    out = np.empty((rows, 64), np.float32)
    add_rms_rows(h.numpy(), delta.numpy(), weight.numpy(), np.float32(1e-6), out)
    np.testing.assert_array_equal(h.numpy(), want_h.numpy())
    np.testing.assert_allclose(out, want.numpy(), rtol=FLOAT32_OP_REL, atol=FLOAT32_OP_ATOL)


@pytest.mark.parametrize("heads, kv", [(8, 8), (8, 2), (6, 1)])
@pytest.mark.parametrize("pos0, t", [(0, 1), (0, 7), (5, 4)])
def test_prefill_attention_matches_causal_torch_sdpa(heads, kv, pos0, t):
    hd = 16
    g = torch.Generator().manual_seed(pos0 * 13 + t + heads + kv)
    q = torch.randn(t, heads, hd, generator=g)
    keys, values = torch.randn(20, kv, hd, generator=g), torch.randn(20, kv, hd, generator=g)
    end = pos0 + t
    mask = torch.arange(end)[None, :] <= torch.arange(pos0, end)[:, None]  # query i sees 0..pos0+i
    seen = [c[:end].transpose(0, 1)[None] for c in (keys, values)]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], *seen, attn_mask=mask,
                                         enable_gqa=heads != kv)[0].transpose(0, 1)
    out = np.empty((t, heads, hd), np.float32)
    prefill_attention(q.numpy(), keys.numpy(), values.numpy(), pos0, out)
    np.testing.assert_allclose(out, ref.numpy(), rtol=FLOAT32_OP_REL, atol=FLOAT32_OP_REL)


def test_route_rows_routes_each_row_as_route_token():
    g = torch.Generator().manual_seed(5)
    x, router = torch.randn(6, 96, generator=g).numpy(), torch.randn(16, 96, generator=g).numpy()
    w, e = np.empty((6, 4), np.float32), np.empty((6, 4), np.int64)
    route_rows(x, router, True, w, e)
    for t in range(6):
        wt, et = np.empty(4, np.float32), np.empty(4, np.int64)
        route_token(x[t], router, True, wt, et)
        np.testing.assert_array_equal(w[t], wt)
        np.testing.assert_array_equal(e[t], et)
