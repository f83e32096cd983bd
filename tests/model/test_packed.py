"""Packed dense matrices (--dense-bits): block-wise packing, matmul and embedding rows vs the oracle."""

import inspect

import numpy as np
import pytest
import torch

import edge_moe
from edge_moe.errors import UsageError
from edge_moe.format.layout import build_layout, pack_expert, unpack_matrix
from edge_moe.format.nested import dequantize, quantize
from edge_moe.kernels import cpu, reference
from edge_moe.model import packed
from tests.kernels.test_cpu_kernels import q8
from tests.tolerances import KERNEL_INT16_ACT_REL, SAME_FORMULA_ATOL

ROWS, N = 300, 160  # neither a multiple of the row block (set to 128 below) nor of the group


@pytest.fixture
def weight():
    return (torch.from_numpy(np.random.default_rng(0).standard_normal((ROWS, N)).astype(np.float32)) * 0.05
            ).to(torch.bfloat16)


def oracle(w: torch.Tensor, bits: int) -> np.ndarray:
    """The b-bit dequantized matrix from quantizing W whole (no row blocks)."""
    return dequantize(quantize(w.float().numpy(), packed.SCHEME, packed.GROUP), bits)


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_block_packing_equals_whole_matrix(weight, bits, monkeypatch):
    monkeypatch.setattr(packed, "ROWS_PER_BLOCK", 128)
    p = packed.pack_linear(weight, bits, reference)
    layout = build_layout({"w": (ROWS, N)}, packed.SCHEME, packed.GROUP)
    whole = np.frombuffer(pack_expert(layout, {"w": quantize(weight.float().numpy(), packed.SCHEME,
                                                              packed.GROUP)}), np.uint8)
    assert p.nbytes == layout.bytes_for_bits(bits) < layout.nbytes
    assert np.array_equal(p.buf, whole[:p.nbytes])
    unpacked = dequantize(unpack_matrix(p.layout, p.buf, "w", bits), bits)
    np.testing.assert_array_equal(unpacked, oracle(weight, bits))


def test_8_bits_are_byte_codes_of_the_whole_matrix(weight, monkeypatch):
    """At 8 bits the codes are bytes (ByteLinear), packed in row blocks, equal to the 8 planes of the
    whole matrix put back together."""
    monkeypatch.setattr(packed, "ROWS_PER_BLOCK", 128)
    p = packed.pack_linear(weight, 8, reference)
    assert isinstance(p, packed.ByteLinear)
    m = quantize(weight.float().numpy(), packed.SCHEME, packed.GROUP)
    planes = np.unpackbits(m.planes, axis=-1, bitorder="little")  # [8, O, Npad]
    codes = sum(planes[k].astype(np.uint16) << (7 - k) for k in range(8))
    np.testing.assert_array_equal(p.codes, codes)
    np.testing.assert_array_equal(p.scale, m.scale.astype(np.float32))
    np.testing.assert_array_equal(p.minimum, m.minimum.astype(np.float32))
    assert p.nbytes == ROWS * (2 * 128 + 2 * 2 * 4)


def test_4_bits_are_nibble_codes_of_the_whole_matrix(weight, monkeypatch):
    """At 4 bits the codes are the top 4 bits of the whole matrix's planes, two per byte (byte j of a
    block of 64: weight j low, weight j + 32 high), with the 4-bit planes' scale and
    offset; rows dequantize exactly as the 4 planes do."""
    monkeypatch.setattr(packed, "ROWS_PER_BLOCK", 128)
    p = packed.pack_linear(weight, 4, reference)
    assert isinstance(p, packed.NibbleLinear)
    m = quantize(weight.float().numpy(), packed.SCHEME, packed.GROUP)
    planes = np.unpackbits(m.planes, axis=-1, bitorder="little")  # [8, O, Npad]
    top4 = sum(planes[k].astype(np.uint8) << (3 - k) for k in range(4))  # [O, Npad]
    want = np.zeros((ROWS, top4.shape[1] // 2), np.uint8)
    for b in range(0, top4.shape[1], 64):
        for j in range(32):
            want[:, b // 2 + j] = top4[:, b + j] | (top4[:, b + 32 + j] << 4)
    np.testing.assert_array_equal(p.codes, want)
    s = m.scale.astype(np.float32)
    np.testing.assert_array_equal(p.scale, 16 * s)
    np.testing.assert_array_equal(p.minimum, m.minimum.astype(np.float32) + 7.5 * s)
    ids = np.array([299, 0, 7, 7])
    np.testing.assert_array_equal(p.rows(ids), oracle(weight, 4)[ids])


@pytest.mark.parametrize("backend", [reference, cpu], ids=lambda b: b.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_matmul_and_rows_match_dequantized(weight, backend, t, bits):
    """At 4 bits the cpu backend takes int8 activations, so its oracle gets q8(x), as the planes' does."""
    p = packed.pack_linear(weight, bits, backend)
    x = torch.from_numpy(np.random.default_rng(t).standard_normal((2, t, N)).astype(np.float32))
    xq = q8(x.numpy(), packed.GROUP) if backend is cpu and bits <= cpu.ACT8_MAX_BITS else x.numpy()
    want = xq @ oracle(weight, bits).T
    got = p(x).numpy()
    assert got.shape == (2, t, ROWS)
    assert np.abs(got - want).max() / np.abs(want).max() < KERNEL_INT16_ACT_REL
    ids = np.array([299, 0, 7, 7])
    np.testing.assert_allclose(p.rows(ids), oracle(weight, bits)[ids], rtol=0,
                               atol=SAME_FORMULA_ATOL)


@pytest.mark.parametrize("bits", [4, 8])
def test_code_matmuls_refuse_a_misshapen_input(weight, bits):
    p = packed.pack_linear(weight, bits, cpu)
    matmul = cpu.nibble_matmul if bits == 4 else cpu.byte_matmul
    for n in (N + 128, N - 40):
        with pytest.raises(UsageError, match="do not fit"):
            matmul(p.codes, p.scale, p.minimum, torch.zeros(1, n))


def test_what_is_packed():
    assert all(packed.packs(n) for n in ("embed", "lm_head", "layers.3.qkv", "layers.0.o", "layers.2.mlp_down",
                                         "layers.1.shared_gate_up"))
    assert not any(packed.packs(n) for n in ("layers.0.router", "layers.0.q_norm", "layers.0.qkv_bias",
                                             "final_norm", "layers.1.shared_gate", "layers.0.attn_norm"))


def test_demo_model_at_dense_8_bits_scores_like_bf16():
    """Packing the dense part at 8 bits barely moves the demo model (held-out perplexity +0.05%,
    tools/eval_dense_bits.py); 4 bits moves it clearly more, so the check can tell them apart."""
    import json.decoder
    logits, nbytes = {}, {}
    for bits in (16, 8, 4):
        with edge_moe.load(dense_bits=bits) as m:
            logits[bits] = m.logits(m.encode(inspect.getsource(json.decoder))[:200], bits=8)
            nbytes[bits] = sum(t.nbytes for t in m.decoder.w.values())
    err = {b: np.linalg.norm(logits[b] - logits[16]) / np.linalg.norm(logits[16]) for b in (8, 4)}
    agree = {b: (logits[b].argmax(-1) == logits[16].argmax(-1)).mean() for b in (8, 4)}
    assert err[8] < 0.05 and agree[8] >= 0.95, (err, agree)  # measured 3.1%, 100%; 4 bits: 15%, 86%
    assert err[4] > 2 * err[8]
    assert nbytes[4] < nbytes[8] < 0.6 * nbytes[16]


def test_bad_dense_bits_are_refused():
    with pytest.raises(UsageError, match="dense bits 3"):
        edge_moe.load(dense_bits=3)
