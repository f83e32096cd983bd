"""CUDA backend against the reference on dequantized weights: every level, both schemes, odd sizes."""

import functools
import warnings

import numpy as np
import pytest
import torch

from edge_moe.errors import UsageError
from edge_moe.format.layout import build_layout, pack_expert
from edge_moe.format.nested import BASE_BITS, MAX_BITS, SCHEMES, quantize
from edge_moe.kernels import cuda, reference
from tests.tolerances import KERNEL_REL

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


# ---------------------------------------------------------------- torch fallback (any device)

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", GROUPS)
def test_fallback_dequantize_matches_oracle(scheme, group):
    layout, buf = expert(scheme, group)
    for bits in BITS:
        for matrix in ("gate_up", "down"):
            want = reference.dequantized(layout, buf, matrix, bits)
            got = cuda.dequantized(layout, torch.from_numpy(buf), matrix, bits)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


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
def test_expert_ffn_units_matches_contiguous_buffer():
    from edge_moe.format.layout import build_layout, pack_expert, to_units
    from edge_moe.format.nested import quantize

    layout = build_layout({"gate_up": (192, 160), "down": (160, 96)}, "msb", 64)
    rng = np.random.default_rng(3)
    mats = {k: quantize(rng.standard_normal(s).astype(np.float32) * 0.05, "msb", 64)
            for k, s in dict(layout.matrices).items()}
    buf = np.frombuffer(pack_expert(layout, mats), dtype=np.uint8)
    units = to_units(layout, buf)[::-1].copy()  # chunks stored in reverse unit order
    arena = torch.from_numpy(units).cuda()
    x = torch.randn(3, 160, device="cuda")
    for bits in (2, 5, 8):
        got = cuda.expert_ffn_units(layout, arena, np.arange(7, -1, -1), x, bits)
        want = cuda.expert_ffn(layout, torch.from_numpy(buf.copy()).cuda(), x, bits)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
