"""Slow, obvious reference ops on nested experts: dequantize with the format oracle, then matmul."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge_moe.format.layout import ExpertLayout, unpack_matrix
from edge_moe.format.nested import dequantize


def dequantized(layout: ExpertLayout, buf: np.ndarray, matrix: str, bits: int) -> torch.Tensor:
    """The b-bit weight [O, N] float32 of one matrix in an expert buffer."""
    return torch.from_numpy(dequantize(unpack_matrix(layout, buf, matrix, bits), bits))


def nested_matmul(layout: ExpertLayout, buf: np.ndarray, matrix: str, x: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """y [T, O] = x [T, N] @ W_b.T."""
    return x.float() @ dequantized(layout, buf, matrix, bits).T


def expert_ffn(layout: ExpertLayout, buf: np.ndarray, x: torch.Tensor, bits: int) -> torch.Tensor:
    """SwiGLU expert at `bits`: down(silu(gate(x)) * up(x)), x [T, D] -> [T, D]."""
    gate, up = nested_matmul(layout, buf, "gate_up", x, bits).chunk(2, dim=-1)
    return nested_matmul(layout, buf, "down", F.silu(gate) * up, bits)
