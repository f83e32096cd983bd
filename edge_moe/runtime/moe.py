"""MoE dispatch: group a layer's tokens by routed expert and run each expert's FFN at its bit width."""

from __future__ import annotations

import torch

from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import bits_to_level
from edge_moe.runtime.expert_store import ExpertStore


class MoeDispatch:
    """The decoder's `experts` callable: store -> buffers -> kernel backend, at `self.bits`."""

    def __init__(self, store: ExpertStore, layout: ExpertLayout, backend, bits: int = 8):
        self.store, self.layout, self.backend, self.bits = store, layout, backend, bits

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                 experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)  # [T, D]
        for e in torch.unique(experts).tolist():
            tokens, slots = torch.where(experts == e)
            buf = self.store.get(layer, e, bits_to_level(self.bits))
            y = self.backend.expert_ffn(self.layout, buf, x[tokens], self.bits)  # [n, D]
            out.index_add_(0, tokens, y * weights[tokens, slots, None])
        return out
