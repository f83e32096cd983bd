"""Nested quantization and the expert byte layout: round trips for every level and scheme."""

import numpy as np
import pytest

from edge_moe.format.layout import build_layout, pack_expert, unpack_matrix
from edge_moe.format.nested import (
    BASE_BITS,
    MAX_BITS,
    SCHEMES,
    dequantize,
    group_coefficients,
    quantize,
    quantize_rtn,
    unpack_planes,
)
from tests.tolerances import SAME_FORMULA_ATOL, SAME_FORMULA_REL

SHAPES = {"gate_up": (2 * 48, 200), "down": (200, 48)}  # 200 and 48 are not multiples of the group


def weights(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", [64, 128])
def test_error_halves_with_each_bit(scheme, group):
    w = weights((64, 300))
    m = quantize(w, scheme, group)
    errs = [rel(dequantize(m, b), w) for b in range(BASE_BITS, MAX_BITS + 1)]
    assert all(0.4 < errs[i + 1] / errs[i] < 0.65 for i in range(len(errs) - 1)), errs
    assert errs[-1] < 0.012, errs


def test_msb_8_bits_is_the_8_bit_code():
    w = weights((32, 128))
    m = quantize(w, "msb", 128)
    step = m.scale.astype(np.float32).repeat(128, axis=1)
    assert np.all(np.abs(dequantize(m, 8) - w) <= 0.51 * step + 1e-7)


def test_msb_prefix_is_bucket_centre_of_the_8_bit_code():
    m = quantize(weights((8, 64)), "msb", 64)
    q8 = np.einsum("p,pogk->ogk", 2.0 ** np.arange(7, -1, -1), unpack_planes(m.planes, 64))
    for bits in range(BASE_BITS, MAX_BITS):
        coef, offset = group_coefficients(m, bits)
        bucket = 2 ** (8 - bits)
        centre = np.floor(q8 / bucket) * bucket + (bucket - 1) / 2
        want = centre * m.scale.astype(np.float32)[..., None] + m.minimum.astype(np.float32)[..., None]
        np.testing.assert_allclose(dequantize(m, bits), want.reshape(8, -1),
                                   rtol=SAME_FORMULA_REL, atol=SAME_FORMULA_ATOL)


def test_rtn_baseline_is_not_nested_but_close():
    w = weights((16, 256))
    assert rel(quantize_rtn(w, 8, 128), w) < 0.01
    assert rel(quantize_rtn(w, 2, 128), w) > rel(quantize_rtn(w, 3, 128), w)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_expert_pack_unpack_round_trip_every_level(scheme):
    layout = build_layout(SHAPES, scheme, 64)
    mats = {k: quantize(weights(s, i), scheme, 64) for i, (k, s) in enumerate(SHAPES.items())}
    buf = np.frombuffer(pack_expert(layout, mats), dtype=np.uint8)
    for bits in range(BASE_BITS, MAX_BITS + 1):
        prefix = buf[:layout.bytes_for_bits(bits)].copy()  # a prefix read holds exactly these levels
        for name, m in mats.items():
            got = dequantize(unpack_matrix(layout, prefix, name, bits), bits)
            np.testing.assert_array_equal(got, dequantize(m, bits))


def test_layout_levels_are_increasing_prefixes():
    layout = build_layout(SHAPES, "mwq", 64)
    ends = layout.level_ends
    assert len(ends) == MAX_BITS - BASE_BITS + 1 and all(a < b for a, b in zip(ends, ends[1:], strict=False))
    assert all(s.offset % 64 == 0 for s in layout.sections)
    with pytest.raises(ValueError, match="bits need"):
        unpack_matrix(layout, np.zeros(ends[0], np.uint8), "down", 3)


def test_group_must_be_whole_words():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(weights((4, 100)), "msb", 100)
