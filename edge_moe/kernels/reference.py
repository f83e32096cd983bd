"""Slow, obvious reference ops on nested experts: dequantize with the format oracle, then matmul in torch.
x may be a tensor or a numpy array; the result is of the same kind."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge_moe.format.layout import ExpertLayout, from_units, unpack_matrix
from edge_moe.format.nested import dequantize, nibbles_to_bytes


def dequantized(layout: ExpertLayout, buf: np.ndarray, matrix: str, bits: int) -> torch.Tensor:
    """The b-bit weight [O, N] float32 of one matrix in an expert buffer."""
    return torch.from_numpy(dequantize(unpack_matrix(layout, buf, matrix, bits), bits))


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, np.float32))


def _like(y: torch.Tensor, x):
    """y as x's kind: a tensor, or a numpy array."""
    return y if isinstance(x, torch.Tensor) else y.numpy()


def nested_matmul(layout: ExpertLayout, buf: np.ndarray, matrix: str, x: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W_b.T."""
    return _like(_tensor(x).float() @ dequantized(layout, buf, matrix, bits).T, x)


def byte_matmul(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W.T for W held as 8-bit codes [O, ng*G] uint8 with float32 scale and
    minimum [O, ng]: w = scale * q + minimum per group of G."""
    o, ng = scale.shape
    q = torch.from_numpy(codes.reshape(o, ng, -1)).float()
    w = (q * torch.from_numpy(scale)[..., None] + torch.from_numpy(minimum)[..., None]).reshape(o, -1)
    return _like(_tensor(x).float() @ w[:, :x.shape[1]].T, x)


def nibble_matmul(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """byte_matmul for W held as 4-bit codes, two per byte (nibbles_to_bytes)."""
    return byte_matmul(nibbles_to_bytes(codes), scale, minimum, x)


def expert_ffn(layout: ExpertLayout, buf: np.ndarray, x: torch.Tensor, bits: int) -> torch.Tensor:
    """SwiGLU expert at `bits`: down(silu(gate(x)) * up(x)), x [T, D] -> [T, D]."""
    gate, up = nested_matmul(layout, buf, "gate_up", _tensor(x), bits).chunk(2, dim=-1)
    return _like(nested_matmul(layout, buf, "down", F.silu(gate) * up, bits), x)


def moe_ffn(layout: ExpertLayout, slab: np.ndarray, slots: np.ndarray, bits: np.ndarray,
            x: np.ndarray, ptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """All of a layer's active experts in one call.

    slab [S, B] uint8 holds expert ranges (slot s = one expert's first levels); active expert j
    lives in slot slots[j] and runs at bits[j] on tokens[ptr[j]:ptr[j+1]] (CSR), scaled by
    weights[ptr[j]:ptr[j+1]]. x [T, D] float32 -> out [T, D] float32 = sum of weighted expert outputs.
    """
    out = torch.zeros(x.shape, dtype=torch.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    for j in range(len(slots)):
        rows = torch.from_numpy(np.asarray(tokens[ptr[j]:ptr[j + 1]], dtype=np.int64))
        y = expert_ffn(layout, slab[slots[j]], xt[rows], int(bits[j]))
        out.index_add_(0, rows, y * torch.from_numpy(np.asarray(weights[ptr[j]:ptr[j + 1]]))[:, None])
    return out.numpy()


def expert_ffn_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, x: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """expert_ffn on an expert whose chunk c lives in arena[units[c]] (the expert cache's form)."""
    return expert_ffn(layout, from_units(layout, arena, units, bits), x, bits)


def moe_ffn_units(layout: ExpertLayout, arena: np.ndarray, units: np.ndarray, bits: np.ndarray,
                  x: torch.Tensor, ptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """moe_ffn on experts held as arena units (the runtime's form): entry j's chunk c is
    arena[units[j, c]]; x [T, D] -> out [T, D] float32 on x's device."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    xt = _tensor(x).detach().float().cpu()
    for j in range(len(bits)):
        rows = torch.from_numpy(np.asarray(tokens[ptr[j]:ptr[j + 1]], dtype=np.int64))
        if len(rows):
            y = expert_ffn_units(layout, arena, units[j], xt[rows], int(bits[j]))
            w = torch.from_numpy(np.asarray(weights[ptr[j]:ptr[j + 1]], np.float32))
            out.index_add_(0, rows, y * w[:, None])
    return out.to(x.device) if isinstance(x, torch.Tensor) else out.numpy()


def resident_forms(layout: ExpertLayout, arena) -> None:
    """The reference keeps resident experts as the file's planes: no other storage forms (cpu has some)."""
    return None
