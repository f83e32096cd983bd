"""The cpu backend's LUT form (2-bit experts, T-MAC's table lookups) against an oracle of its arithmetic
written out in numpy, and against the reference within the error its int8 tables allow."""

import numpy as np
import pytest
import torch

from edge_moe.errors import UsageError
from edge_moe.format.layout import from_units, unpack_matrix
from edge_moe.kernels import cpu, reference
from edge_moe.kernels.cpu.simd.isa import STRIDED
from tests.kernels.test_cpu_kernels import D, make_expert, q8, q8_oracle, tokens, two_scattered  # noqa: F401
from tests.tolerances import LUT_ORACLE_REL, LUT_TABLE_REL

# the LUT form exists for msb at group 128 on AVX2 without AVX-512 only (cpu.lut_form); other hosts run
# this module in test_cpu_targets' haswell child
pytestmark = pytest.mark.skipif(not STRIDED, reason="the LUT form is compiled on AVX2 without AVX-512 only")

ORACLE_REL, TABLE_REL = LUT_ORACLE_REL, LUT_TABLE_REL


@pytest.fixture(scope="module")
def expert():
    """The one layout the LUT form serves: msb at group 128."""
    return make_expert("msb", 128)


def _lut_case(expert):
    """(layout, arena in LUT form, the same in plane form, units [2, 8]) of two experts in scattered units."""
    layout, buf = expert
    assert cpu.lut_form(layout)
    arena, units = two_scattered(layout, buf)
    planes = arena.copy()
    for u in units:
        cpu.to_lut_form(layout, arena, u)
    return layout, arena, planes, units


def lut_matmul(m, x: np.ndarray) -> np.ndarray:
    """The LUT form's y = x @ W_2.T for the nested matrix m, independently: per group of 128, the int8
    high digits h of x (q8), tables of the subset sums of every 4 of them requantized by
    st = max(1, max|sum| / 127), looked up by the 2-bit codes' planes (code 2 b0 + b1), times s d st."""
    G, (o, n) = m.group, m.shape
    T, ng = x.shape[0], -(-n // G)
    xg = np.zeros((T, ng * G), np.float32)
    xg[:, :n] = q8(x, G)
    xg = xg.reshape(T, ng, G)
    d = np.abs(xg).max(-1) / np.float32(127 * 256)
    h = np.rint(xg / np.where(d > 0, 256 * d, 1)[..., None]).astype(np.int64)  # q8(x) = 256 d h exactly
    bits = np.unpackbits(m.planes[:2], axis=-1, bitorder="little")[:, :, :ng * G].astype(np.int64)
    subsets = (np.arange(16)[:, None] >> np.arange(4)) & 1  # [16, 4]
    y = np.zeros((T, o))
    for g in range(ng):
        sums = (h[:, g].reshape(T, 32, 4) @ subsets.T).astype(np.float32)  # [T, 32 quads, 16]
        st = np.maximum(np.float32(1), np.abs(sums).max((1, 2)) / np.float32(127))
        table = np.rint(sums * (np.float32(1) / st)[:, None, None])  # float32 as the kernel (ties)
        index = bits[:, :, g * G:(g + 1) * G].reshape(2, o, 32, 4) @ (1 << np.arange(4))  # [2, O, 32]
        quad = np.arange(32)
        dot = 2 * table[:, quad, index[0]].sum(-1) + table[:, quad, index[1]].sum(-1)  # [T, O]
        s, low = m.scale[:, g].astype(np.float64), m.minimum[:, g].astype(np.float64)
        y += (d[:, g] * 256 * 64 * st)[:, None] * dot * s + (low + s * 31.5) * xg[:, g].sum(-1)[:, None]
    return y


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_lut_form_transposes_planes_0_1_in_place_and_back(expert):
    """In chunks 0 and 1, per block of 16 rows: row r's plane byte 16 g + j lands at 256 g + 32 (j // 2) +
    16 (j % 2) + r, and its fp16 scale / minimum of group g at 16 g + r; everything else is untouched;
    back=True restores the planes exactly."""
    layout, arena, planes, units = _lut_case(expert)
    moved = np.zeros(arena.shape, bool)
    for name, (o, n) in layout.matrices:
        ng = -(-n // layout.group)
        rb, start, meta = 16 * ng, layout.in_chunk(name, "planes"), layout.in_chunk(name, "meta")
        for c in range(2):
            u = units[0, c]
            was = planes[u, start:start + o * rb].reshape(o // 16, 16, ng, 8, 2)
            now = arena[u, start:start + o * rb].reshape(o // 16, ng, 8, 2, 16)
            np.testing.assert_array_equal(now, was.transpose(0, 2, 3, 4, 1), err_msg=f"{name} chunk {c}")
            was = planes[u, meta:meta + 2 * o * ng].view(np.uint16).reshape(o // 16, 16, ng)
            now = arena[u, meta:meta + 2 * o * ng].view(np.uint16).reshape(o // 16, ng, 16)
            np.testing.assert_array_equal(now, was.transpose(0, 2, 1), err_msg=f"{name} chunk {c} metadata")
            for k in range(2):
                moved[units[k, c], start:start + o * rb] = True
                moved[units[k, c], meta:meta + 2 * o * ng] = True
    np.testing.assert_array_equal(arena[~moved], planes[~moved])
    for u in units:
        cpu.to_lut_form(layout, arena, u, back=True)
    np.testing.assert_array_equal(arena, planes)


@pytest.mark.parametrize("t", [1, 2, 33, 64])
def test_nested_matmul_units_lut_form(expert, t):
    """At 2 bits on the LUT form: equal to its oracle, and near the exact matmul on q8(x)."""
    layout, arena, planes, units = _lut_case(expert)
    for k in range(2):
        buf = from_units(layout, planes, units[k], 8)
        for name, (_, n) in layout.matrices:
            x = tokens(t, n, seed=t + k)
            got = cpu.nested_matmul_units(layout, arena, units[k], name, x, 2, form=cpu.LUT_FORM)
            assert rel(got, lut_matmul(unpack_matrix(layout, buf, name, 2), x.numpy())) < ORACLE_REL
            exact = reference.nested_matmul(layout, buf, name, torch.from_numpy(q8(x.numpy(), 128)), 2)
            assert rel(got, exact) < TABLE_REL


@pytest.mark.parametrize("t", [1, 2, 33])
def test_moe_ffn_units_lut_form_beside_other_forms(expert, t):
    """One call over an expert in LUT form (2 bits), the other expert in plane form at 2 and 3 bits:
    the LUT entry equals the oracle FFN (lut_matmul for gate_up and down), the others the reference."""
    layout, arena, planes, units = _lut_case(expert)
    mixed = arena.copy()
    mixed[units[1]] = planes[units[1]]
    rng = np.random.default_rng(t)
    x = tokens(t, D, seed=t)
    bits, forms = np.array([2, 2, 3]), np.array([cpu.LUT_FORM, cpu.PLANE_FORM, cpu.PLANE_FORM])
    entries = np.stack([units[0], units[1], units[1]])
    counts = rng.integers(1, t + 1, size=3)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    tok = np.concatenate([rng.choice(t, c, replace=False) for c in counts]).astype(np.int64)
    w = rng.random(len(tok)).astype(np.float32)
    got = cpu.moe_ffn_units(layout, mixed, entries, bits, x, ptr, tok, w, form=forms)
    want = np.zeros((t, D))
    buf0 = from_units(layout, planes, units[0], 8)
    rows = tok[ptr[0]:ptr[1]]
    h = lut_matmul(unpack_matrix(layout, buf0, "gate_up", 2), x.numpy()[rows])
    gate, up = np.split(h, 2, axis=1)
    act = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
    np.add.at(want, rows, w[ptr[0]:ptr[1], None] * lut_matmul(unpack_matrix(layout, buf0, "down", 2), act))
    others = reference.moe_ffn_units(layout, planes, entries[1:], bits[1:], x, ptr[1:] - ptr[1], tok[ptr[1]:],
                                     w[ptr[1]:])
    assert rel(got, want + others.numpy()) < 10 * ORACLE_REL  # silu in float32 vs float64


def test_lut_form_refusals(expert):
    """LUT form only at 2 bits, only on layouts that have it; its rewrite needs chunks 0 and 1."""
    layout, arena, planes, units = _lut_case(expert)
    x = tokens(1, D)
    with pytest.raises(UsageError, match=r"form 2 \(LUT form.*not 2 bits in LUT form"):
        cpu.nested_matmul_units(layout, arena, units[0], "down", x, 3, form=cpu.LUT_FORM)
    with pytest.raises(UsageError, match="lack chunks 0, 1"):
        cpu.to_lut_form(layout, arena, np.r_[units[0, :1], [-1] * 7])
