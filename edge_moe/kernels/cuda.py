"""CUDA backend: bit-plane GEMV/GEMM kernels from native/, built at first use, with a torch fallback.

The ops mirror `reference.py` on torch tensors: experts are uint8 tensors (one expert range, a slab
[S, B] with one expert slot per row, or an arena [U, unit_bytes] holding each expert's chunks in
scattered units), x is [T, N] float32/float16/bfloat16, results are float32. The kernels read every
expert through the addresses of its 8 chunks, so all three forms run without a copy. On CUDA tensors
the native kernels run (native/README.md); when they cannot be built (no nvcc, no GPU of sm_75 or
newer, a compile error) a one-line warning says why, once, and the same ops run as torch code:
dequantize the planes on the tensors' device, then matmul.
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
SOURCES = ("binding.cpp", "launch.cu", "nested_gemm_msb.cu", "nested_gemm_mwq.cu", "gemv_msb.cu", "gemv_mwq.cu")
MAX_JOBS = 64  # active experts per launch (kMaxJobs in native/nested_gemm.cuh)
BLOCKS_PER_SM = 0  # k split: 0 = the planner's default (native/launch.cu); n > 0 = aim for n blocks per SM
KERNEL_AUTO, KERNEL_MMA16, KERNEL_GEMV = 0, 1, 2  # kernel choice: gemv_kernel for T <= 2 where it applies

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
    """[scheme, O, N, G, plane offset in a chunk, metadata offset in a chunk] of one matrix (binding.cpp).

    Plane p of the matrix is in chunk p and its metadata (scale in chunk 0, minimum in chunk 1, alpha
    of plane p in chunk p) follow the planes of every matrix, so both offsets are the same in every chunk.
    """
    key = (id(layout), matrix)
    hit = _desc_cache.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1]
    shapes = dict(layout.matrices)
    if matrix not in shapes:
        raise UsageError(f"matrix {matrix!r} is not in the expert layout; it has {', '.join(shapes)}")
    o, n = shapes[matrix]
    planes = {s.offset - layout.chunk_starts[s.chunk] for s in layout.sections
              if s.matrix == matrix and s.kind == "planes"}
    meta = {s.offset - layout.chunk_starts[s.chunk] for s in layout.sections
            if s.matrix == matrix and s.kind != "planes"}
    assert len(planes) == 1 and len(meta) == 1, "sections of a matrix must sit alike in every chunk"
    desc = [0 if layout.scheme == "msb" else 1, o, n, layout.group, planes.pop(), meta.pop()]
    _desc_cache[key] = (layout, desc)
    return desc


def _range_chunks(layout: ExpertLayout, start: int) -> list[int]:
    """Byte offsets of chunks 0..7 of a contiguous expert range that starts `start` bytes into the base."""
    return [start + c for c in layout.chunk_starts]


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


def _check_arena(layout: ExpertLayout, arena) -> torch.Tensor:
    arena = _as_bytes(arena)
    if arena.dim() != 2 or arena.stride(1) != 1 or arena.stride(0) % 8:
        raise UsageError(f"arena must be [U, unit_bytes] uint8 with rows on 8-byte boundaries, got "
                         f"shape {tuple(arena.shape)} strides {arena.stride()}")
    if arena.shape[1] < max(layout.chunk_sizes):
        raise UsageError(f"arena rows hold {arena.shape[1]} bytes, the layout's chunks need "
                         f"{max(layout.chunk_sizes)}")
    return arena


def _units_jobs(layout: ExpertLayout, arena: torch.Tensor, units, bits: list[int],
                ptr: list[int]) -> np.ndarray:
    """Kernel jobs [J, 11] (bits, row0, count, chunk offsets) of entries whose chunk c is arena row
    units[j, c], entries without rows left out; numpy over all entries at once (a Python loop per
    entry would add host time to every decode layer)."""
    if isinstance(units, torch.Tensor):
        units = units.cpu().numpy()
    units = np.asarray(units, dtype=np.int64).reshape(len(bits), -1)
    for b in set(bits):
        _check_bits(layout, layout.nbytes, b)
    b = np.asarray(bits, dtype=np.int64).reshape(-1, 1)
    held = np.full((len(bits), MAX_BITS), -1, dtype=np.int64)
    held[:, :min(MAX_BITS, units.shape[1])] = units[:, :MAX_BITS]
    needed = np.arange(MAX_BITS) < b
    bad = needed & ((held < 0) | (held >= arena.shape[0]))
    if bad.any():
        j = int(np.argmax(bad.any(axis=1)))
        raise UsageError(f"entry {j} at {bits[j]} bits lacks chunks or names units outside the arena's "
                         f"{arena.shape[0]}: units {units[j].tolist()}")
    ptr = np.asarray(ptr, dtype=np.int64)
    jobs = np.concatenate([b, ptr[:-1, None], np.diff(ptr)[:, None],
                           np.where(needed, held * arena.stride(0), 0)], axis=1)
    return jobs[jobs[:, 2] > 0]


# ---------------------------------------------------------------- public ops

def nested_matmul(layout: ExpertLayout, buf, matrix: str, x: torch.Tensor, bits: int,
                  out: torch.Tensor | None = None, blocks_per_sm: int = BLOCKS_PER_SM,
                  kernel: int = KERNEL_AUTO) -> torch.Tensor:
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
    ext.gemm(buf, desc, [bits, 0, x.shape[0], *_range_chunks(layout, 0)], x, None, False, out, None, None,
             False, blocks_per_sm, kernel)
    return out


def _ffn(ext, layout: ExpertLayout, base: torch.Tensor, jobs, x: torch.Tensor, rows: int,
         tokens: torch.Tensor | None, weights: torch.Tensor | None, blocks_per_sm: int,
         kernel: int) -> torch.Tensor:
    """Two launches per MAX_JOBS jobs (rows of 11 ints): gate_up of every job into h [rows, 2I] (x rows
    `tokens`), then down reading silu(h[:, :I]) * h[:, I:], scaled by `weights` and added into
    out[tokens] [T, D]."""
    i2, d = dict(layout.matrices)["gate_up"]
    t = x.shape[0]
    scratch = torch.zeros(rows * i2 + t * d, dtype=torch.float32, device=x.device)  # one memset for both
    h, out = scratch[:rows * i2].view(rows, i2), scratch[rows * i2:].view(t, d)
    up, down = matrix_desc(layout, "gate_up"), matrix_desc(layout, "down")
    jobs = np.asarray(jobs, dtype=np.int64).reshape(-1, 3 + MAX_BITS)
    for c in range(0, len(jobs), MAX_JOBS):
        part = jobs[c:c + MAX_JOBS].ravel().tolist()
        ext.gemm(base, up, part, x, tokens, False, h, None, None, True, blocks_per_sm, kernel)
        ext.gemm(base, down, part, h, None, True, out, tokens, weights, True, blocks_per_sm, kernel)
    return out


def expert_ffn(layout: ExpertLayout, buf, x: torch.Tensor, bits: int,
               blocks_per_sm: int = BLOCKS_PER_SM, kernel: int = KERNEL_AUTO) -> torch.Tensor:
    """SwiGLU expert at `bits`: down(silu(gate(x)) * up(x)), x [T, D] -> [T, D] float32."""
    buf = _as_bytes(buf)
    bits = _check_bits(layout, buf.numel(), bits)
    x = _check_x(x, dict(layout.matrices)["gate_up"][1], buf.device)
    ext = _ext_for(buf)
    if ext is None:
        return torch_expert_ffn(layout, buf, x, bits)
    t = x.shape[0]
    return _ffn(ext, layout, buf, [[bits, 0, t, *_range_chunks(layout, 0)]], x, t, None, None, blocks_per_sm,
                kernel)


def gather_units(layout: ExpertLayout, arena: torch.Tensor, units, bits: int) -> torch.Tensor:
    """One contiguous expert range from chunks held in arena rows (the torch fallback's input)."""
    index = torch.as_tensor(np.asarray(units[:bits], dtype=np.int64)).to(arena.device, non_blocking=True)
    rows = arena.index_select(0, index)  # [bits, U]
    return torch.cat([rows[c, :layout.chunk_sizes[c]] for c in range(bits)])


def expert_ffn_units(layout: ExpertLayout, arena: torch.Tensor, units, x: torch.Tensor,
                     bits: int, blocks_per_sm: int = BLOCKS_PER_SM, kernel: int = KERNEL_AUTO) -> torch.Tensor:
    """expert_ffn on an expert whose chunk c lives in arena row units[c] (the runtime's form); the
    kernels read the chunks where they are."""
    arena = _check_arena(layout, arena)
    bits = _check_bits(layout, layout.nbytes, bits)
    x = _check_x(x, dict(layout.matrices)["gate_up"][1], arena.device)
    t = x.shape[0]
    jobs = _units_jobs(layout, arena, [units], [bits], [0, t])
    ext = _ext_for(arena)
    if ext is None:
        return torch_expert_ffn(layout, gather_units(layout, arena, np.asarray(units), bits), x, bits)
    if not len(jobs):
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return _ffn(ext, layout, arena, jobs, x, t, None, None, blocks_per_sm, kernel)


def _routing(x: torch.Tensor, tokens, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (int32) and weights (float32) on x's device; host arrays go over in one copy."""
    on_host = not isinstance(tokens, torch.Tensor) and not isinstance(weights, torch.Tensor)
    if x.device.type != "cpu" and on_host:
        t, w = np.asarray(tokens, dtype=np.int32).ravel(), np.asarray(weights, dtype=np.float32).ravel()
        both = torch.from_numpy(np.concatenate([t, w.view(np.int32)])).to(x.device)
        return both[:len(t)], both[len(t):].view(torch.float32)
    tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    weights = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
    return (tokens.to(device=x.device, dtype=torch.int32).contiguous(),
            weights.to(device=x.device, dtype=torch.float32).contiguous())


def moe_ffn(layout: ExpertLayout, slab, slots, bits, x: torch.Tensor, ptr, tokens, weights,
            blocks_per_sm: int = BLOCKS_PER_SM, kernel: int = KERNEL_AUTO) -> torch.Tensor:
    """All of a layer's active experts, two launches (gate_up, then down with silu * up fused).

    slab [S, B] uint8 on the GPU; active expert j lives in slot slots[j], runs at bits[j] on rows
    tokens[ptr[j]:ptr[j+1]] of x (CSR), scaled by weights[ptr[j]:ptr[j+1]]. slots, bits and ptr
    are host-side (lists, numpy or CPU tensors); tokens (int32) and weights (float32) may already
    be on the GPU. x [T, D] -> out [T, D] float32 = sum of weighted expert outputs.
    """
    slab = _as_bytes(slab)
    if slab.dim() != 2 or slab.stride(1) != 1 or slab.stride(0) % 8:
        raise UsageError(f"slab must be [S, B] with rows on 8-byte boundaries, got shape {tuple(slab.shape)}")
    slots, bits, ptr = (_host_ints(v) for v in (slots, bits, ptr))
    if len(ptr) != len(slots) + 1 or len(bits) != len(slots):
        raise UsageError(f"moe_ffn: {len(slots)} slots need {len(slots)} bits and {len(slots) + 1} ptr entries")
    for s, b in zip(slots, bits, strict=True):
        if not 0 <= s < slab.shape[0]:
            raise UsageError(f"slot {s} is outside the slab's {slab.shape[0]} slots")
        _check_bits(layout, slab.shape[1], b)
    x = _check_x(x, dict(layout.matrices)["gate_up"][1], slab.device)
    tokens, weights = _routing(x, tokens, weights)
    ext = _ext_for(slab)
    if ext is None:
        return torch_moe_ffn(layout, slab, slots, bits, x, ptr, tokens, weights)
    jobs = [[bits[j], ptr[j], ptr[j + 1] - ptr[j], *_range_chunks(layout, slots[j] * slab.stride(0))]
            for j in range(len(slots)) if ptr[j + 1] > ptr[j]]
    return _ffn(ext, layout, slab, jobs, x, ptr[-1], tokens, weights, blocks_per_sm, kernel)


def moe_ffn_units(layout: ExpertLayout, arena: torch.Tensor, units, bits, x: torch.Tensor, ptr, tokens,
                  weights, blocks_per_sm: int = BLOCKS_PER_SM, kernel: int = KERNEL_AUTO) -> torch.Tensor:
    """moe_ffn on experts held as arena units (the runtime's form, see reference.moe_ffn_units): entry
    j's chunk c is arena row units[j, c] (-1: not held), read in place; two launches per layer."""
    arena = _check_arena(layout, arena)
    bits, ptr = _host_ints(bits), _host_ints(ptr)
    if len(ptr) != len(bits) + 1:
        raise UsageError(f"moe_ffn_units: {len(bits)} entries need {len(bits) + 1} ptr entries, got {len(ptr)}")
    x = _check_x(x, dict(layout.matrices)["gate_up"][1], arena.device)
    jobs = _units_jobs(layout, arena, units, bits, ptr)
    tokens, weights = _routing(x, tokens, weights)
    ext = _ext_for(arena)
    if ext is None:
        units = np.asarray(units.cpu().numpy() if isinstance(units, torch.Tensor) else units,
                           dtype=np.int64).reshape(len(bits), -1)
        slab = torch.zeros((max(len(bits), 1), layout.nbytes), dtype=torch.uint8, device=arena.device)
        for j, b in enumerate(bits):
            row = gather_units(layout, arena, units[j], b)
            slab[j, :row.numel()] = row
        return torch_moe_ffn(layout, slab, list(range(len(bits))), bits, x, ptr, tokens, weights)
    return _ffn(ext, layout, arena, jobs, x, ptr[-1], tokens, weights, blocks_per_sm, kernel)


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
    _, o, n, group, plane_in, meta_in = matrix_desc(layout, matrix)
    starts = layout.chunk_starts
    ng = num_groups(n, group)
    meta = (o, ng)
    scale, minimum = _f16(buf, starts[0] + meta_in, meta), _f16(buf, starts[1] + meta_in, meta)
    if layout.scheme == "msb":  # group_coefficients in format/nested.py
        coefs = [scale * float(2 ** (7 - p)) for p in range(bits)]
        offset = minimum + scale * ((2 ** (MAX_BITS - bits) - 1) / 2)
    else:
        alphas = [_f16(buf, starts[p] + meta_in, meta) for p in range(BASE_BITS, bits)]
        coefs = [2 * scale, scale, *(2 * a for a in alphas)]
        offset = minimum - sum(alphas) if alphas else minimum
    row_bytes = ng * group // 8
    shifts = torch.arange(8, device=buf.device, dtype=torch.uint8)
    w = offset[..., None].expand(o, ng, group).clone()
    for p in range(bits):
        plane = buf[starts[p] + plane_in:starts[p] + plane_in + o * row_bytes].view(o, row_bytes)
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


def resident_forms(layout: ExpertLayout, arena) -> None:
    """The cuda kernels read resident experts as the file's planes: no other storage forms (cpu has some)."""
    return None
