"""CUDA backend against the reference on dequantized weights: every level, both schemes, odd sizes."""

import functools
import warnings

import numpy as np
import pytest
import torch

from edge_moe.errors import UsageError
from edge_moe.format.layout import build_layout, pack_expert, to_units
from edge_moe.format.nested import BASE_BITS, MAX_BITS, SCHEMES, quantize
from edge_moe.kernels import cuda, reference
from tests.tolerances import KERNEL_REL, SAME_FORMULA_ATOL, SAME_FORMULA_REL

BITS = list(range(BASE_BITS, MAX_BITS + 1))
GROUPS = [64, 128]
TOKENS = [1, 2, 33, 64]
DIM, INTER = 160, 96  # gate_up [192, 160], down [160, 96]: neither a multiple of 128 nor of a row tile


@functools.cache
def expert(scheme: str, group: int, seed: int = 0, d: int = DIM, i: int = INTER):
    """(layout, packed expert range as uint8 numpy) of one random SwiGLU expert."""
    shapes = {"gate_up": (2 * i, d), "down": (d, i)}
    layout = build_layout(shapes, scheme, group)
    rng = np.random.default_rng(seed)
    mats = {k: quantize(rng.standard_normal(s).astype(np.float32) * 0.02, scheme, group)
            for k, s in shapes.items()}
    return layout, np.frombuffer(pack_expert(layout, mats), dtype=np.uint8).copy()


def inputs(t: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((t, n)).astype(np.float32))


def rel(got: torch.Tensor, want) -> float:
    got = got.detach().cpu().double()
    want = torch.as_tensor(want).double()
    assert got.shape == want.shape and torch.isfinite(got).all()
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def routing(t: int, experts: int, k: int, seed: int = 2):
    """CSR routing of t tokens to k of `experts` experts: (ptr, tokens, weights) grouped by expert."""
    rng = np.random.default_rng(seed)
    chosen = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(t)])  # [T, K]
    gate = rng.random((t, k)).astype(np.float32) + 0.1
    ptr, tokens, weights = [0], [], []
    for e in range(experts):
        rows, cols = np.nonzero(chosen == e)
        tokens += rows.tolist()
        weights += gate[rows, cols].tolist()
        ptr.append(len(tokens))
    return np.array(ptr), np.array(tokens, np.int32), np.array(weights, np.float32)


def moe_case(scheme: str, group: int, t: int, experts: int = 5, k: int = 3):
    """A slab whose slots hold only the levels of their expert's bits (the rest is garbage)."""
    layout = expert(scheme, group)[0]
    rng = np.random.default_rng(3)
    slots = rng.permutation(experts + 1)[:experts]  # one spare slot, unused
    bits = rng.integers(BASE_BITS, MAX_BITS + 1, size=experts)
    slab = rng.integers(0, 256, size=(experts + 1, layout.nbytes), dtype=np.uint8)
    for e in range(experts):
        buf = expert(scheme, group, seed=10 + e)[1]
        n = layout.bytes_for_bits(int(bits[e]))
        slab[slots[e], :n] = buf[:n]
    ptr, tokens, weights = routing(t, experts, k)
    return layout, slab, slots, bits, ptr, tokens, weights


def units_case(scheme: str, group: int, t: int, seed: int = 4):
    """Two experts held as scattered arena units (the runtime's form); entry 2 is expert 0 again at
    fewer bits (the runtime splits an expert's tokens by width). Returns (layout, arena, units, bits,
    ptr, tokens, weights); some entries may get no token."""
    layout, buf = expert(scheme, group)
    other = expert(scheme, group, seed=7)[1]
    rng = np.random.default_rng(seed)
    arena = rng.integers(0, 256, size=(20, layout.unit_bytes), dtype=np.uint8)  # garbage where not held
    units = np.array([[3, 17, 5, 9, 0, 12, 1, 19], [2, 4, 6, 8, 10, -1, -1, -1],
                      [3, 17, 5, 9, 0, 12, 1, 19]])
    arena[units[0]] = to_units(layout, buf)
    arena[units[1, :5]] = to_units(layout, other, 5)
    bits = np.array([8, 5, 3]) if scheme == "msb" else np.array([7, 5, 2])
    counts = rng.integers(0, t + 1, size=3)
    counts[rng.integers(0, 3)] = max(1, t // 2)  # at least one entry with tokens
    ptr = np.concatenate([[0], np.cumsum(counts)])
    tokens = np.concatenate([rng.choice(t, c, replace=False) for c in counts]).astype(np.int32)
    weights = rng.random(len(tokens)).astype(np.float32)
    return layout, arena, units, bits, ptr, tokens, weights


# ---------------------------------------------------------------- torch fallback (any device)

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
def test_fallback_dequantize_matches_oracle(scheme, group):
    layout, buf = expert(scheme, group)
    for bits in BITS:
        for matrix in ("gate_up", "down"):
            want = reference.dequantized(layout, buf, matrix, bits)
            got = cuda.dequantized(layout, torch.from_numpy(buf), matrix, bits)
            torch.testing.assert_close(got, want, rtol=SAME_FORMULA_REL, atol=SAME_FORMULA_ATOL)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fallback_ops_on_cpu_tensors(scheme):
    layout, buf = expert(scheme, 64)
    x = inputs(5, DIM)
    assert rel(cuda.nested_matmul(layout, torch.from_numpy(buf), "gate_up", x, 4),
               reference.nested_matmul(layout, buf, "gate_up", x, 4)) < KERNEL_REL
    assert rel(cuda.expert_ffn(layout, buf, x, 3), reference.expert_ffn(layout, buf, x, 3)) < KERNEL_REL
    layout, slab, slots, bits, ptr, tokens, weights = moe_case(scheme, 64, 7)
    want = reference.moe_ffn(layout, slab, slots, bits, inputs(7, DIM).numpy(), ptr, tokens, weights)
    got = cuda.moe_ffn(layout, torch.from_numpy(slab), slots, bits, inputs(7, DIM), ptr, tokens, weights)
    assert rel(got, want) < KERNEL_REL


def test_fallback_moe_ffn_units_on_cpu_tensors():
    layout, arena, units, bits, ptr, tokens, weights = units_case("mwq", 64, 5)
    x = inputs(5, DIM)
    want = reference.moe_ffn_units(layout, arena, units, bits, x, ptr, tokens, weights)
    got = cuda.moe_ffn_units(layout, torch.from_numpy(arena), units, bits, x, ptr, tokens, weights)
    assert rel(got, want) < KERNEL_REL


def test_moe_ffn_units_refuses_missing_chunks():
    layout, arena, units, bits, ptr, tokens, weights = units_case("msb", 64, 4)
    units = units.copy()
    units[1, 3] = -1  # entry 1 runs at 5 bits: chunk 3 is needed
    with pytest.raises(UsageError, match="entry 1 at 5 bits lacks chunks"):
        cuda.moe_ffn_units(layout, torch.from_numpy(arena), units, bits, inputs(4, DIM), ptr, tokens, weights)
    with pytest.raises(UsageError, match="arena rows hold"):
        cuda.moe_ffn_units(layout, torch.from_numpy(arena[:, :64]), units, bits, inputs(4, DIM), ptr, tokens,
                           weights)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("nvcc not found (set CUDA_HOME)")

    monkeypatch.setattr(cuda, "_build", broken)
    monkeypatch.setattr(cuda, "_state", {"ext": None, "error": None})
    with pytest.warns(RuntimeWarning, match=r"CUDA kernels unavailable \(nvcc not found.*torch fallback"):
        assert cuda.native() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda.native() is None  # said once
    assert "nvcc" in cuda.native_error()
    if torch.cuda.is_available():
        layout, buf = expert("mwq", 128)
        x = inputs(3, DIM)
        got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), "gate_up", x.cuda(), 5)
        assert rel(got, reference.nested_matmul(layout, buf, "gate_up", x, 5)) < KERNEL_REL


def test_user_errors_name_the_problem():
    layout, buf = expert("msb", 64)
    with pytest.raises(UsageError, match="bits must be in 2..8"):
        cuda.nested_matmul(layout, buf, "down", inputs(1, INTER), 9)
    with pytest.raises(UsageError, match="bits need"):
        cuda.nested_matmul(layout, buf[:layout.bytes_for_bits(3)], "down", inputs(1, INTER), 4)
    with pytest.raises(UsageError, match=r"x must be a \[T, 96\]"):
        cuda.nested_matmul(layout, buf, "down", inputs(1, DIM), 4)
    with pytest.raises(UsageError, match="not in the expert layout"):
        cuda.nested_matmul(layout, buf, "up", inputs(1, DIM), 4)


# ---------------------------------------------------------------- native kernels (GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("matrix", ["gate_up", "down"])
def test_nested_matmul(scheme, group, bits, t, matrix):
    layout, buf = expert(scheme, group)
    n = dict(layout.matrices)[matrix][1]
    x = inputs(t, n, seed=bits * 100 + t)
    got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), matrix, x.cuda(), bits)
    assert cuda.native() is not None, cuda.native_error()
    assert rel(got, reference.nested_matmul(layout, buf, matrix, x, bits)) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 9, 40])
def test_nested_matmul_half_inputs(scheme, dtype, t):
    layout, buf = expert(scheme, 128)
    x = inputs(t, DIM).to(dtype)
    for bits in (2, 5, 8):
        got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), "gate_up", x.cuda(), bits)
        assert rel(got, reference.nested_matmul(layout, buf, "gate_up", x.float(), bits)) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("blocks_per_sm", [1, 4, 64])  # few k parts (many pipeline stages) .. many
def test_partial_row_tiles_and_long_k(scheme, group, blocks_per_sm):
    layout, buf = expert(scheme, group, seed=5, d=2112, i=50)  # gate_up [100, 2112], down [2112, 50]
    for t, bits in ((1, 3), (9, 8), (20, 6)):
        for matrix in ("gate_up", "down"):
            n = dict(layout.matrices)[matrix][1]
            x = inputs(t, n, seed=t)
            got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), matrix, x.cuda(), bits,
                                     blocks_per_sm=blocks_per_sm)
            assert rel(got, reference.nested_matmul(layout, buf, matrix, x, bits)) < KERNEL_REL


@pytest.mark.cuda
def test_every_output_is_written():
    layout, buf = expert("msb", 64)
    for t in (1, 33):
        out = torch.full((t, 2 * INTER), float("nan"), device="cuda")
        cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), "gate_up", inputs(t, DIM).cuda(), 4, out=out)
        assert torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("t", [1, 33])
def test_expert_ffn(scheme, group, bits, t):
    layout, buf = expert(scheme, group)
    x = inputs(t, DIM, seed=bits)
    got = cuda.expert_ffn(layout, torch.from_numpy(buf).cuda(), x.cuda(), bits)
    assert rel(got, reference.expert_ffn(layout, buf, x, bits)) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("t", TOKENS)
def test_moe_ffn_mixed_bits_one_launch_per_matrix(scheme, group, t):
    layout, slab, slots, bits, ptr, tokens, weights = moe_case(scheme, group, t)
    x = inputs(t, DIM, seed=t)
    want = reference.moe_ffn(layout, slab, slots, bits, x.numpy(), ptr, tokens, weights)
    got = cuda.moe_ffn(layout, torch.from_numpy(slab).cuda(), slots, bits, x.cuda(), ptr,
                       torch.from_numpy(tokens).cuda(), torch.from_numpy(weights).cuda())
    assert rel(got, want) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_fallback_on_gpu(scheme):
    layout, slab, slots, bits, ptr, tokens, weights = moe_case(scheme, 128, 6)
    x = inputs(6, DIM)
    want = reference.moe_ffn(layout, slab, slots, bits, x.numpy(), ptr, tokens, weights)
    got = cuda.torch_moe_ffn(layout, torch.from_numpy(slab).cuda(), [int(s) for s in slots],
                             [int(b) for b in bits], x.cuda(), [int(p) for p in ptr],
                             torch.from_numpy(tokens).cuda(), torch.from_numpy(weights).cuda())
    assert got.is_cuda and rel(got, want) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("t", [1, 2, 33])
def test_moe_ffn_units_reads_scattered_chunks(scheme, group, t):
    """A layer's entries as scattered arena units, mixed bits, one expert twice at two widths: the
    kernels read the chunks in place (no gather) and match the reference on the same units."""
    layout, arena, units, bits, ptr, tokens, weights = units_case(scheme, group, t, seed=t)
    x = inputs(t, DIM, seed=t)
    want = reference.moe_ffn_units(layout, arena, units, bits, x, ptr, tokens, weights)
    got = cuda.moe_ffn_units(layout, torch.from_numpy(arena).cuda(), units, bits, x.cuda(), ptr,
                             torch.from_numpy(tokens).cuda(), torch.from_numpy(weights).cuda())
    assert got.is_cuda and rel(got, want) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_expert_ffn_units_reads_scattered_chunks(scheme):
    layout, arena, units, _, _, _, _ = units_case(scheme, 128, 3)
    arena_gpu = torch.from_numpy(arena).cuda()
    for t, bits in ((1, 2), (2, 5), (3, 8)):
        x = inputs(t, DIM, seed=bits)
        want = reference.expert_ffn_units(layout, arena, units[0], x, bits)
        assert rel(cuda.expert_ffn_units(layout, arena_gpu, units[0], x.cuda(), bits), want) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("kernel", [cuda.KERNEL_MMA16, cuda.KERNEL_GEMV])
def test_each_kernel_on_decode_shapes(scheme, group, kernel):
    """Both kernels that can serve T <= 2, forced, at every level (auto picks gemv_kernel there)."""
    layout, buf = expert(scheme, group, seed=5, d=2112, i=50)  # gate_up [100, 2112], down [2112, 50]
    for bits in BITS:
        for t in (1, 2):
            for matrix in ("gate_up", "down"):
                n = dict(layout.matrices)[matrix][1]
                x = inputs(t, n, seed=bits * 10 + t)
                got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), matrix, x.cuda(), bits,
                                         kernel=kernel)
                assert rel(got, reference.nested_matmul(layout, buf, matrix, x, bits)) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("blocks_per_sm", [0, 64])  # 64: k split over blocks (atomics into a zeroed out)
def test_gemv_long_k(scheme, blocks_per_sm):
    layout, buf = expert(scheme, 128, seed=6, d=40, i=8320)  # down [40, 8320]: 65 spans, 17 chunks
    x = inputs(1, 8320)
    for bits in (2, 4, 8):
        got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), "down", x.cuda(), bits,
                                 blocks_per_sm=blocks_per_sm, kernel=cuda.KERNEL_GEMV)
        assert rel(got, reference.nested_matmul(layout, buf, "down", x, bits)) < KERNEL_REL


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemv_forced_plans(scheme):
    """Plans the planner picks only on other shapes: warps per block that are not powers of two (a partial
    last block), every ring depth (the ring wraps: 9 chunks per warp at kw 1), k parts per block, with and
    without programmatic dependent launch; each against the reference."""
    layout, buf = expert(scheme, 128, seed=8, d=4224, i=36)  # gate_up [72, 4224]: 9 row tiles, 33 spans
    gpu = torch.from_numpy(buf).cuda()
    ext = cuda.native()
    try:
        for pdl, kw, nw, stages in ((True, 1, 7, 3), (False, 1, 5, 4), (True, 2, 6, 2), (True, 1, 3, 4),
                                    (False, 4, 4, 3), (True, 8, 8, 2)):
            ext.set_gemv_options(pdl, kw, nw, stages)
            for bits in (2, 3, 4, 5, 8):
                x = inputs(1 + bits % 2, 4224, seed=bits)
                got = cuda.nested_matmul(layout, gpu, "gate_up", x.cuda(), bits, kernel=cuda.KERNEL_GEMV)
                assert rel(got, reference.nested_matmul(layout, buf, "gate_up", x, bits)) < KERNEL_REL, \
                    (pdl, kw, nw, stages, bits)
    finally:
        ext.set_gemv_options(True, 0, 0, 0)


@pytest.mark.cuda
def test_gemv_inputs_with_wide_range():
    """x spanning many binades inside a span (24-bit integers per span) and all-zero spans."""
    layout, buf = expert("msb", 128)
    x = inputs(2, DIM) * torch.logspace(-6, 3, DIM)
    x[:, 128:] = 0.0
    for bits in (3, 8):
        got = cuda.nested_matmul(layout, torch.from_numpy(buf).cuda(), "gate_up", x.cuda(), bits,
                                 kernel=cuda.KERNEL_GEMV)
        assert rel(got, reference.nested_matmul(layout, buf, "gate_up", x, bits)) < KERNEL_REL
