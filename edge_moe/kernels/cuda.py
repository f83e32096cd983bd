"""CUDA backend: bit-plane GEMV/GEMM kernels from native/, built at first use, with a torch fallback.

The ops mirror `reference.py` on torch tensors: expert buffers are uint8 tensors (one expert range,
or a slab [S, B] with one expert slot per row), x is [T, N] float32/float16/bfloat16, results are
float32. On CUDA tensors the native kernels run (native/README.md); when they cannot be built (no
nvcc, no GPU of sm_75 or newer, a compile error) a one-line warning says why, once, and the same
ops run as torch code: dequantize the planes on the tensors' device, then matmul.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_moe.errors import UsageError
from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import BASE_BITS, MAX_BITS, num_groups

NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"
SOURCES = ("binding.cpp", "launch.cu", "nested_gemm_msb.cu", "nested_gemm_mwq.cu")
MAX_JOBS = 128  # active experts per launch (kMaxJobs in native/nested_gemm.cuh)
BLOCKS_PER_SM = 0  # k split: 0 = wave model of native/launch.cu; n > 0 = aim for n blocks per SM

_state = {"ext": None, "error": None}  # the built extension, or why it could not be built


# ---------------------------------------------------------------- building

def _build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (7, 5):
        raise RuntimeError(f"GPU is sm_{major}{minor}; the kernels need sm_75 or newer")
    if CUDA_HOME is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    missing = [s for s in SOURCES if not (NATIVE_DIR / s).exists()]
    if missing:
        raise RuntimeError(f"native sources missing in {NATIVE_DIR}: {', '.join(missing)}")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "edge_moe" / "torch_extensions"
    name = f"edge_moe_cuda_sm{major}{minor}"
    build_dir = Path(root) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # TORCH_CUDA_ARCH_LIST (e.g. "7.5;8.6;8.9;9.0") picks other targets; unset: the present GPUs'.
    return load(name=name, sources=[str(NATIVE_DIR / s) for s in SOURCES], build_directory=str(build_dir),
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)


def native():
    """The built extension, or None (after one warning naming the reason) when it cannot be had."""
    if _state["ext"] is None and _state["error"] is None:
        try:
            _state["ext"] = _build()
        except Exception as e:  # a failed compile raises many types; all mean "use the fallback"
            reason = " ".join(str(e).split())[:300]
            _state["error"] = reason
            warnings.warn(f"edge_moe CUDA kernels unavailable ({reason}); using the torch fallback "
                          "(dequantize + matmul)", RuntimeWarning, stacklevel=3)
    return _state["ext"]


def native_error() -> str | None:
    """Why the native kernels could not be built (None if they were, or were never tried)."""
    return _state["error"]


# ---------------------------------------------------------------- layout -> matrix descriptor

_desc_cache: dict[tuple[int, str], tuple[ExpertLayout, list[int]]] = {}


def matrix_desc(layout: ExpertLayout, matrix: str) -> list[int]:
    """[scheme, O, N, G, plane_off x8, scale_off, min_off, alpha_off x6] of one matrix (binding.cpp)."""
    key = (id(layout), matrix)
    hit = _desc_cache.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1]
    shapes = dict(layout.matrices)
    if matrix not in shapes:
        raise UsageError(f"matrix {matrix!r} is not in the expert layout; it has {', '.join(shapes)}")
    o, n = shapes[matrix]
    first = {}
    alpha = [0] * (MAX_BITS - BASE_BITS)
    for s in layout.sections:
        if s.matrix == matrix and s.kind in ("scale", "minimum"):
            first[s.kind] = s.offset
        if s.matrix == matrix and s.kind == "alpha":
            alpha[s.level - 2] = s.offset
    planes = [int(v) for v in layout.plane_offsets(matrix)]
    desc = [0 if layout.scheme == "msb" else 1, o, n, layout.group, *planes, first["scale"], first["minimum"],
            *alpha]
    _desc_cache[key] = (layout, desc)
    return desc


# ---------------------------------------------------------------- argument checks

def _as_bytes(buf) -> torch.Tensor:
    if isinstance(buf, np.ndarray):
        buf = torch.from_numpy(np.ascontiguousarray(buf).view(np.uint8))
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8:
        raise UsageError("expert buffer must be a uint8 torch tensor (or numpy array)")
    return buf


def _check_bits(layout: ExpertLayout, nbytes: int, bits: int) -> int:
    bits = int(bits)
    if not BASE_BITS <= bits <= MAX_BITS:
        raise UsageError(f"bits must be in {BASE_BITS}..{MAX_BITS}, got {bits}")
    if nbytes < layout.bytes_for_bits(bits):
        raise UsageError(f"expert buffer holds {nbytes} bytes, {bits} bits need {layout.bytes_for_bits(bits)}")
    return bits


def _check_x(x: torch.Tensor, n: int, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != n:
        raise UsageError(f"x must be a [T, {n}] tensor, got {tuple(getattr(x, 'shape', ()))}")
    if x.device != device:
        raise UsageError(f"x is on {x.device} but the expert buffer is on {device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    return x if x.stride(1) == 1 else x.contiguous()


def _ext_for(t: torch.Tensor):
    return native() if t.is_cuda else None


# ---------------------------------------------------------------- public ops

def nested_matmul(layout: ExpertLayout, buf, matrix: str, x: torch.Tensor, bits: int,
                  out: torch.Tensor | None = None, blocks_per_sm: int = BLOCKS_PER_SM) -> torch.Tensor:
    """y [T, O] float32 = x [T, N] @ W_b.T for one expert buffer (uint8 [B], on x's device)."""
    buf = _as_bytes(buf)
    bits = _check_bits(layout, buf.numel(), bits)
    desc = matrix_desc(layout, matrix)
    o, n = desc[1], desc[2]
    x = _check_x(x, n, buf.device)
    ext = _ext_for(buf)
    if ext is None:
        y = x.float() @ dequantized(layout, buf, matrix, bits).T
        return y if out is None else out.copy_(y)
    out = torch.empty(x.shape[0], o, dtype=torch.float32, device=x.device) if out is None else out
    ext.gemm(buf, desc, [0, bits, 0, x.shape[0]], x, None, False, out, None, None,
             False, blocks_per_sm)
    return out


def expert_ffn(layout: ExpertLayout, buf, x: torch.Tensor, bits: int,
               blocks_per_sm: int = BLOCKS_PER_SM) -> torch.Tensor:
    """SwiGLU expert at `bits`: down(silu(gate(x)) * up(x)), x [T, D] -> [T, D] float32."""
    buf = _as_bytes(buf)
    bits = _check_bits(layout, buf.numel(), bits)
    i2, d = dict(layout.matrices)["gate_up"]
    x = _check_x(x, d, buf.device)
    ext = _ext_for(buf)
    if ext is None:
        return torch_expert_ffn(layout, buf, x, bits)
    t = x.shape[0]
    scratch = torch.zeros(t * (i2 + d), dtype=torch.float32, device=x.device)  # one memset for both
    h, out = scratch[:t * i2].view(t, i2), scratch[t * i2:].view(t, d)
    job = [0, bits, 0, t]
    ext.gemm(buf, matrix_desc(layout, "gate_up"), job, x, None, False, h, None, None, True, blocks_per_sm)
    ext.gemm(buf, matrix_desc(layout, "down"), job, h, None, True, out, None, None, True, blocks_per_sm)
    return out


def gather_units(layout: ExpertLayout, arena: torch.Tensor, units, bits: int) -> torch.Tensor:
    """One contiguous expert range from chunks held in arena rows (chunks are back to back on disk)."""
    index = torch.as_tensor(np.asarray(units[:bits], dtype=np.int64)).to(arena.device, non_blocking=True)
    rows = arena.index_select(0, index)  # [bits, U]
    return torch.cat([rows[c, :layout.chunk_sizes[c]] for c in range(bits)])


def expert_ffn_units(layout: ExpertLayout, arena: torch.Tensor, units, x: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """expert_ffn on an expert cached as units of a GPU arena (the runtime's form): gather, then run.
    The gather costs one extra device copy of the expert's active bytes."""
    return expert_ffn(layout, gather_units(layout, arena, units, bits), x, bits)


def moe_ffn(layout: ExpertLayout, slab, slots, bits, x: torch.Tensor, ptr, tokens, weights,
            blocks_per_sm: int = BLOCKS_PER_SM) -> torch.Tensor:
    """All of a layer's active experts, two launches (gate_up, then down with silu * up fused).

    slab [S, B] uint8 on the GPU; active expert j lives in slot slots[j], runs at bits[j] on rows
    tokens[ptr[j]:ptr[j+1]] of x (CSR), scaled by weights[ptr[j]:ptr[j+1]]. slots, bits and ptr
    are host-side (lists, numpy or CPU tensors); tokens (int32) and weights (float32) may already
    be on the GPU. x [T, D] -> out [T, D] float32 = sum of weighted expert outputs.
    """
    slab = _as_bytes(slab)
    if slab.dim() != 2:
        raise UsageError(f"slab must be [S, B], got shape {tuple(slab.shape)}")
    slots, bits, ptr = (_host_ints(v) for v in (slots, bits, ptr))
    if len(ptr) != len(slots) + 1 or len(bits) != len(slots):
        raise UsageError(f"moe_ffn: {len(slots)} slots need {len(slots)} bits and {len(slots) + 1} ptr entries")
    for s, b in zip(slots, bits, strict=True):
        if not 0 <= s < slab.shape[0]:
            raise UsageError(f"slot {s} is outside the slab's {slab.shape[0]} slots")
        _check_bits(layout, slab.shape[1], b)
    i2, d = dict(layout.matrices)["gate_up"]
    x = _check_x(x, d, slab.device)
    tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    weights = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
    tokens = tokens.to(device=x.device, dtype=torch.int32).contiguous()
    weights = weights.to(device=x.device, dtype=torch.float32).contiguous()
    ext = _ext_for(slab)
    if ext is None:
        return torch_moe_ffn(layout, slab, slots, bits, x, ptr, tokens, weights)
    t, total = x.shape[0], ptr[-1]
    scratch = torch.zeros(total * i2 + t * d, dtype=torch.float32, device=x.device)
    h, out = scratch[:total * i2].view(total, i2), scratch[total * i2:].view(t, d)
    jobs = [v for j in range(len(slots)) if ptr[j + 1] > ptr[j]
            for v in (slots[j], bits[j], ptr[j], ptr[j + 1] - ptr[j])]
    up, down = matrix_desc(layout, "gate_up"), matrix_desc(layout, "down")
    for c in range(0, len(jobs), 4 * MAX_JOBS):
        part = jobs[c:c + 4 * MAX_JOBS]
        ext.gemm(slab, up, part, x, tokens, False, h, None, None, True, blocks_per_sm)
        ext.gemm(slab, down, part, h, None, True, out, tokens, weights, True, blocks_per_sm)
    return out


def moe_ffn_units(layout: ExpertLayout, arena: torch.Tensor, units, bits, x: torch.Tensor, ptr, tokens,
                  weights) -> torch.Tensor:
    """moe_ffn on experts cached as arena units: gather each entry into a slab row, then one moe_ffn.
    The gather costs one extra device copy of the active bytes."""
    bits = _host_ints(bits)
    width = layout.bytes_for_bits(max(bits)) if bits else 0
    slab = torch.zeros((len(bits), width), dtype=torch.uint8, device=arena.device)
    for j, b in enumerate(bits):
        row = gather_units(layout, arena, units[j], b)
        slab[j, :row.numel()] = row
    return moe_ffn(layout, slab, list(range(len(bits))), bits, x, ptr, tokens, weights)


def _host_ints(v) -> list[int]:
    if isinstance(v, torch.Tensor):
        v = v.cpu().numpy()
    return [int(i) for i in np.asarray(v).reshape(-1)]


# ---------------------------------------------------------------- torch fallback

def _f16(buf: torch.Tensor, offset: int, shape) -> torch.Tensor:
    count = int(np.prod(shape))
    return buf[offset:offset + 2 * count].view(torch.float16).view(*shape).float()


def dequantized(layout: ExpertLayout, buf, matrix: str, bits: int) -> torch.Tensor:
    """The b-bit weight [O, N] float32 of one matrix, with torch ops on the buffer's device."""
    buf = _as_bytes(buf)
    bits = _check_bits(layout, buf.numel(), bits)
    desc = matrix_desc(layout, matrix)
    o, n, group = desc[1:4]
    ng = num_groups(n, group)
    meta = (o, ng)
    scale, minimum = _f16(buf, desc[12], meta), _f16(buf, desc[13], meta)
    if layout.scheme == "msb":  # group_coefficients in format/nested.py
        coefs = [scale * float(2 ** (7 - p)) for p in range(bits)]
        offset = minimum + scale * ((2 ** (MAX_BITS - bits) - 1) / 2)
    else:
        alphas = [_f16(buf, desc[14 + k], meta) for k in range(bits - BASE_BITS)]
        coefs = [2 * scale, scale, *(2 * a for a in alphas)]
        offset = minimum - sum(alphas) if alphas else minimum
    row_bytes = ng * group // 8
    shifts = torch.arange(8, device=buf.device, dtype=torch.uint8)
    w = offset[..., None].expand(o, ng, group).clone()
    for p in range(bits):
        plane = buf[desc[4 + p]:desc[4 + p] + o * row_bytes].view(o, row_bytes)
        bit = ((plane[..., None] >> shifts) & 1).reshape(o, ng, group)  # little bit order along N
        w += coefs[p][..., None] * bit
    return w.reshape(o, ng * group)[:, :n]


def torch_expert_ffn(layout: ExpertLayout, buf, x: torch.Tensor, bits: int) -> torch.Tensor:
    """The fallback expert: dequantize gate_up and down with torch ops, then two matmuls."""
    gate, up = (x.float() @ dequantized(layout, buf, "gate_up", bits).T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ dequantized(layout, buf, "down", bits).T


def torch_moe_ffn(layout, slab, slots, bits, x, ptr, tokens, weights) -> torch.Tensor:
    """The fallback layer: one torch expert at a time, weighted into out [T, D]."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    rows_all = tokens.long()
    for j, (slot, b) in enumerate(zip(slots, bits, strict=True)):
        rows = rows_all[ptr[j]:ptr[j + 1]]
        if len(rows):
            y = torch_expert_ffn(layout, slab[slot], x[rows], b)
            out.index_add_(0, rows, y * weights[ptr[j]:ptr[j + 1], None])
    return out
