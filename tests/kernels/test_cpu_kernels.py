"""The cpu (numba) backend against the reference, on dequantized weights: every level, both schemes."""

import numpy as np
import pytest
import torch
from numba import njit, prange

from edge_moe.errors import UsageError
from edge_moe.format.layout import build_layout, from_units, pack_expert, to_units, unpack_matrix
from edge_moe.format.nested import BASE_BITS, MAX_BITS, SCHEMES, quantize, to_nibbles
from edge_moe.kernels import cpu, get_backend, reference
from edge_moe.kernels.cpu.simd.isa import STRIDED
from tests.tolerances import KERNEL_INT16_ACT_REL

D, INTER = 160, 96  # hidden, intermediate: neither a multiple of the group (64 or 128)
BITS = range(BASE_BITS, MAX_BITS + 1)
TOKENS = [1, 2, 33, 64]


@pytest.fixture(scope="module", params=[(s, g) for s in SCHEMES for g in (64, 128)], ids=str)
def expert(request):
    return make_expert(*request.param)


def make_expert(scheme: str, group: int):
    """(layout, contiguous buffer) of one expert: gate_up [2 INTER, D], down [D, INTER]."""
    rng = np.random.default_rng(group)
    mats = {"gate_up": rng.standard_normal((2 * INTER, D)).astype(np.float32) * 0.05,
            "down": rng.standard_normal((D, INTER)).astype(np.float32) * 0.05}
    layout = build_layout({k: v.shape for k, v in mats.items()}, scheme, group)
    q = {k: quantize(v, scheme, group) for k, v in mats.items()}
    return layout, np.frombuffer(pack_expert(layout, q), dtype=np.uint8).copy()


def q8(x: np.ndarray, group: int) -> np.ndarray:
    """The cpu backend's int8 activations, written out independently: per group of inputs,
    d = max|x_g| / (127 * 256) and x ~ 256 d h, h = rint(x / d) rounded to a multiple of 256."""
    x = np.asarray(x, np.float32)
    out = np.zeros_like(x)
    for lo in range(0, x.shape[-1], group):
        xs = x[..., lo:lo + group]
        d = np.abs(xs).max(-1, keepdims=True) / np.float32(127 * 256)
        safe = np.where(d > 0, d, np.float32(1))
        xi = np.rint(xs * (np.float32(1) / safe)).astype(np.int32)
        high = (xi - (((xi + 128) & 255) - 128)) >> 8
        out[..., lo:lo + group] = np.float32(256) * d * high
    return out


@pytest.fixture(autouse=True)
def q8_oracle(monkeypatch):
    """The reference ops at the cpu backend's activation precision: the input of a matrix at
    <= ACT8_MAX_BITS bits goes through q8 (the kernels compute W_b . q8(x) there, exactly)."""
    exact = reference.nested_matmul

    def nested_matmul(layout, buf, matrix, x, bits):
        if bits <= cpu.ACT8_MAX_BITS:
            x = torch.from_numpy(q8(x.float().numpy(), layout.group))
        return exact(layout, buf, matrix, x, bits)
    monkeypatch.setattr(reference, "nested_matmul", nested_matmul)


def test_q8_is_int8_per_group():
    """The oracle's q8: at most 255 levels per group, within max|x_g| / 254 of x, exact on its grid."""
    x = np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32) * 4
    y = q8(x, 128)
    for lo in range(0, 300, 128):
        xs, ys = x[:, lo:lo + 128], y[:, lo:lo + 128]
        amax = np.abs(xs).max(-1, keepdims=True)
        assert (np.abs(ys - xs) <= amax / 254 * (1 + 1e-5)).all()
        assert max(len(np.unique(r)) for r in ys) <= 255
        np.testing.assert_array_equal(q8(ys, 128)[:, :ys.shape[1]], ys)


def close(y, ref) -> None:
    """Largest error relative to the largest reference value (outputs near 0 are not singled out)."""
    y, ref = np.asarray(y), np.asarray(ref)
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    assert err < KERNEL_INT16_ACT_REL, err


def tokens(t, n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((t, n)).astype(np.float32))


@njit(parallel=True)
def _nan_heap(n, reps):
    """Allocate and free NaN-filled float32 arrays of about n elements in numba's threads, so that the
    kernels' next scratch arrays of that size start as NaN instead of fresh zeros."""
    s = 0.0
    for _t in prange(2):
        for r in range(reps):
            s += np.full(n + r, np.nan, np.float32)[0]
    return s


def test_gemv_reads_no_stale_scratch():
    """Rows of one group (odd ng) in blocks whose coefficient count 16 divides: the GEMV's last group pair
    reads one coefficient past the block, which must be written (it was not: a NaN there made y NaN)."""
    o, n = 512, 96
    w = np.random.default_rng(0).standard_normal((o, n)).astype(np.float32)
    layout = build_layout({"w": (o, n)}, "msb", 128)
    buf = np.frombuffer(pack_expert(layout, {"w": quantize(w, "msb", 128)}), dtype=np.uint8).copy()
    x = tokens(1, n)
    for bits in (2, 4, 6, 8):
        _nan_heap(2 * cpu.ROWS_PER_ITEM + 32, 3)  # the size of _rows' coefficient scratch here
        y = cpu.nested_matmul(layout, buf, "w", x, bits)
        close(y, reference.nested_matmul(layout, buf, "w", x, bits))


@pytest.mark.parametrize("matrix", ["gate_up", "down"])
@pytest.mark.parametrize("bits", BITS)
def test_nested_matmul(expert, matrix, bits):
    layout, buf = expert
    n = dict(layout.matrices)[matrix][1]
    for t in TOKENS:  # T = 1 is the GEMV path, T > 1 the GEMM path (blocks of 4 tokens + a tail)
        x = tokens(t, n, seed=t)
        ref = reference.nested_matmul(layout, buf, matrix, x, bits)
        close(cpu.nested_matmul(layout, buf, matrix, x, bits), ref)


@pytest.mark.parametrize("bits", BITS)
def test_expert_ffn(expert, bits):
    layout, buf = expert
    for t in TOKENS:
        x = tokens(t, D, seed=t)
        close(cpu.expert_ffn(layout, buf, x, bits), reference.expert_ffn(layout, buf, x, bits))


def test_expert_ffn_units_reads_scattered_chunks(expert):
    layout, buf = expert
    bits = 5
    units = to_units(layout, buf, bits)
    arena = np.zeros((12, layout.unit_bytes), dtype=np.uint8)
    where = np.array([9, 2, 7, 0, 11, -1, -1, -1])  # chunk c in unit where[c]; 5..7 not held
    arena[where[:bits]] = units
    x = tokens(3, D)
    close(cpu.expert_ffn_units(layout, arena, where, x, bits),
          reference.expert_ffn_units(layout, arena, where, x, bits))


@pytest.mark.parametrize("t", [1, 2, 33])
def test_moe_ffn_mixed_bits_one_call(expert, t):
    """Several experts of one layer at different bits, CSR routing, one of them with no token."""
    layout, buf = expert
    slab = np.stack([buf, np.frombuffer(_shuffled(layout, buf), dtype=np.uint8), buf])  # 3 slots
    rng = np.random.default_rng(t)
    k = min(2, t)
    routed = np.stack([rng.choice([0, 1, 3], k, replace=False) for _ in range(t)])  # expert 2 gets none
    slots, bits = np.array([0, 1, 2, 0]), np.array([8, 3, 2, 5])
    order = np.argsort(routed.ravel(), kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(routed.ravel(), minlength=4))])
    tok = (order // k).astype(np.int64)
    w = rng.random(t * k).astype(np.float32)
    x = tokens(t, D).numpy()
    close(cpu.moe_ffn(layout, slab, slots, bits, x, ptr, tok, w),
          reference.moe_ffn(layout, slab, slots, bits, x, ptr, tok, w))


@pytest.mark.parametrize("t", [1, 2, 33])
def test_moe_ffn_units_scattered_chunks_mixed_bits(expert, t):
    """A layer's experts held as scattered arena units, one expert twice at two widths (the runtime
    splits an expert's tokens by width), against the reference on the same units."""
    layout, buf = expert
    other = np.frombuffer(_shuffled(layout, buf), dtype=np.uint8)
    arena = np.zeros((20, layout.unit_bytes), dtype=np.uint8)
    units = np.array([[3, 17, 5, 9, 0, 12, 1, 19], [2, 4, 6, 8, 10, -1, -1, -1],
                      [3, 17, 5, 9, 0, 12, 1, 19]])
    arena[units[0]] = to_units(layout, buf)
    arena[units[1, :5]] = to_units(layout, other, 5)
    bits = np.array([8, 5, 3])
    rng = np.random.default_rng(t)
    counts = rng.integers(0, t + 1, size=3)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    tok = np.concatenate([rng.choice(t, c, replace=False) for c in counts]).astype(np.int64)
    w = rng.random(len(tok)).astype(np.float32)
    x = tokens(t, D)
    close(cpu.moe_ffn_units(layout, arena, units, bits, x, ptr, tok, w),
          reference.moe_ffn_units(layout, arena, units, bits, x, ptr, tok, w))


def test_moe_ffn_units_refuses_missing_chunks(expert):
    layout, buf = expert
    arena = np.zeros((4, layout.unit_bytes), dtype=np.uint8)
    units = np.array([[0, 1, 2, -1, -1, -1, -1, -1]])
    args = (tokens(1, D), np.array([0, 1]), np.array([0]), np.ones(1, np.float32))
    with pytest.raises(UsageError, match="lacks chunks"):
        cpu.moe_ffn_units(layout, arena, units, np.array([4]), *args)
    with pytest.raises(UsageError, match="out of range"):
        cpu.moe_ffn_units(layout, arena, units, np.array([9]), *args)
    with pytest.raises(UsageError, match=r"form 1 \(nibble form"):  # reads chunks 0..3 even at 2 bits
        cpu.moe_ffn_units(layout, arena, units, np.array([2]), *args, form=np.array([True]))
    cpu.moe_ffn_units(layout, arena, units, np.array([3]), *args)  # chunks 0..2 are enough here


def _shuffled(layout, buf):
    """Another valid expert: the same matrices with rows reversed (a different byte pattern)."""
    mats = {}
    for name, _ in layout.matrices:
        m = unpack_matrix(layout, buf, name, MAX_BITS)
        m.planes, m.scale, m.minimum = m.planes[:, ::-1], m.scale[::-1], m.minimum[::-1]
        m.alpha = None if m.alpha is None else m.alpha[:, ::-1]
        mats[name] = m
    return pack_expert(layout, mats)


def test_backend_registered_and_refuses_short_buffers(expert):
    layout, buf = expert
    assert get_backend("cpu") is cpu
    with pytest.raises(UsageError, match="4 bits need"):
        cpu.nested_matmul(layout, buf[: layout.bytes_for_bits(4) - 1], "down", tokens(1, INTER), 4)
    with pytest.raises(UsageError, match="bits must be in"):
        cpu.expert_ffn(layout, buf, tokens(1, D), 9)
    with pytest.raises(UsageError, match=r"expected \[T, 160\]"):
        cpu.expert_ffn(layout, buf, tokens(1, D + 1), 4)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [512, 891, 1100])
def test_nested_matmul_long_rows(scheme, n):
    """Rows of whole 512-input blocks plus a tail of 1-3 groups (the GEMV builds codes 512 at a time)
    and enough rows that prefetches run ahead and the rows span two work items, at every level."""
    rng = np.random.default_rng(n)
    w = rng.standard_normal((cpu.ROWS_PER_ITEM + 44, n)).astype(np.float32) * 0.05
    layout = build_layout({"w": w.shape}, scheme, 128)
    buf = np.frombuffer(pack_expert(layout, {"w": quantize(w, scheme, 128)}), dtype=np.uint8)
    for bits in BITS:
        for t in (1, 2):
            x = tokens(t, n, seed=bits)
            ref = reference.nested_matmul(layout, buf, "w", x, bits)
            close(cpu.nested_matmul(layout, buf, "w", x, bits), ref)


# the nibble form exists for msb at group 128 on AVX2 without AVX-512 only (cpu.nibble_form): its tests
# take that one layout, and other hosts run them in test_cpu_targets' haswell child
needs_nibble_form = pytest.mark.skipif(not STRIDED, reason="the nibble form is compiled on AVX2 without "
                                       "AVX-512 only")


@pytest.fixture(scope="module")
def msb128_expert():
    return make_expert("msb", 128)


def _nibble_case(expert):
    """(layout, arena, units [2, 8]) of two experts in scattered units, in a layout with a nibble form."""
    layout, buf = expert
    assert cpu.nibble_form(layout)
    return (layout, *two_scattered(layout, buf))


def two_scattered(layout, buf):
    """(arena, units [2, 8]): the expert and a shuffled copy of it, their chunks in scattered units."""
    arena = np.zeros((18, layout.unit_bytes), dtype=np.uint8)
    units = np.array([[3, 17, 5, 9, 0, 12, 1, 15], [2, 4, 6, 8, 10, 11, 13, 14]])
    arena[units[0]] = to_units(layout, buf)
    arena[units[1]] = to_units(layout, np.frombuffer(_shuffled(layout, buf), dtype=np.uint8))
    return arena, units


@needs_nibble_form
def test_nibble_form_rewrites_planes_in_place(msb128_expert):
    """Row 4k + j's 4-bit codes (the top 4 planes, packed as format.nested.to_nibbles) land in chunk j
    where rows 4k..4k+3 of the planes were; metadata and planes 4.. are untouched."""
    layout, arena, units = _nibble_case(msb128_expert)
    before = arena.copy()
    cpu.to_nibble_form(layout, arena, units[0])
    np.testing.assert_array_equal(np.delete(arena, units[0, :4], 0), np.delete(before, units[0, :4], 0))
    buf = from_units(layout, before, units[0], MAX_BITS)
    for name, (o, _) in layout.matrices:
        m = unpack_matrix(layout, buf, name, 4)
        bits = np.unpackbits(m.planes, axis=-1, bitorder="little")  # [4, O, Npad]
        codes = sum(bits[p] << (3 - p) for p in range(4))
        nib = to_nibbles(codes)
        start, rb = layout.in_chunk(name, "planes"), m.planes.shape[-1]
        for r in range(o):
            got = arena[units[0, r % 4], start + (r - r % 4) * rb:][:4 * rb]
            np.testing.assert_array_equal(got, nib[r], err_msg=f"{name} row {r}")
        meta = layout.in_chunk(name, "meta")
        for c in range(2):
            np.testing.assert_array_equal(arena[units[0, c], meta:], before[units[0, c], meta:])


@needs_nibble_form
@pytest.mark.parametrize("t", [1, 2, 64])
def test_nested_matmul_units_nibble_form_every_level(msb128_expert, t):
    """The GEMV / GEMM on an expert in nibble form (and on its planes, as units) at every width, against
    the reference on the plane form."""
    layout, arena, units = _nibble_case(msb128_expert)
    planes = arena.copy()
    cpu.to_nibble_form(layout, arena, units[0])
    buf = from_units(layout, planes, units[0], MAX_BITS)
    for name, (_, n) in layout.matrices:
        x = tokens(t, n, seed=t)
        for b in BITS:
            ref = reference.nested_matmul(layout, buf, name, x, b)
            close(cpu.nested_matmul_units(layout, arena, units[0], name, x, b, form=cpu.NIBBLE_FORM), ref)
            close(cpu.nested_matmul_units(layout, planes, units[0], name, x, b), ref)
    with pytest.raises(UsageError, match=r"form 1 \(nibble form"):  # reads chunks 0..3 even at 2 bits
        cpu.nested_matmul_units(layout, arena, np.r_[units[0, :2], [-1] * 6], "down", x, 2,
                                form=cpu.NIBBLE_FORM)
    with pytest.raises(UsageError, match="must be 8 unit indices"):
        cpu.nested_matmul_units(layout, arena, units[0, :4], "down", x, 4)


@needs_nibble_form
@pytest.mark.parametrize("t", [1, 2, 33])
def test_moe_ffn_units_nibble_form_every_level(msb128_expert, t):
    """Experts in nibble form at every width (2-4 from the nibbles, 5-8 nibbles plus planes), beside
    one in plane form, against the reference on the plane form."""
    layout, arena, units = _nibble_case(msb128_expert)
    planes = arena.copy()
    cpu.to_nibble_form(layout, arena, units[0])
    cpu.to_nibble_form(layout, arena, units[1])
    plain = np.array([[7, 16, -1, -1, -1, -1, -1, -1]])
    arena[7], arena[16] = planes[units[1, 0]], planes[units[1, 1]]  # expert 1's base, as planes
    planes[7], planes[16] = arena[7], arena[16]
    all_units = np.concatenate([units, plain])
    rng = np.random.default_rng(t)
    x = tokens(t, D, seed=t)
    for b in BITS:
        bits = np.array([b, BITS[-1] + BASE_BITS - b, 2])
        counts = rng.integers(1, t + 1, size=3)
        ptr = np.concatenate([[0], np.cumsum(counts)])
        tok = np.concatenate([rng.choice(t, c, replace=False) for c in counts]).astype(np.int64)
        w = rng.random(len(tok)).astype(np.float32)
        got = cpu.moe_ffn_units(layout, arena, all_units, bits, x, ptr, tok, w, form=np.array([1, 1, 0]))
        close(got, reference.moe_ffn_units(layout, planes, all_units, bits, x, ptr, tok, w))
