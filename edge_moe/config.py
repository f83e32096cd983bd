"""Plain dataclasses shared by every layer: the normalized model config and size parsing."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from edge_moe.errors import UsageError


@dataclass(frozen=True)
class ModelConfig:
    """One decoder description that every adapter maps its Hugging Face config onto."""

    model_type: str
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int  # E
    top_k: int  # K
    moe_intermediate_size: int  # I
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    norm_topk_prob: bool = True
    qk_norm: str = "none"  # "none" | "head" (per-head RMSNorm, Qwen3) | "full" (whole projection, OLMoE)
    attention_bias: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    moe_layers: tuple[int, ...] = ()  # layers whose FFN is MoE; the others are dense MLPs
    intermediate_size: int = 0  # dense-MLP width for non-MoE layers
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["moe_layers"] = tuple(kwargs.get("moe_layers", ()))
        return cls(**kwargs)


DENSE_BITS = (4, 5, 6, 7, 8, 16)  # --dense-bits' choices; 16: keep the file's bf16
CPU_DENSE_BITS = 8  # its default on the cpu (cuda keeps the file's bf16: 16)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float) -> int:
    """'6GB' -> 6e9, '6GiB' -> 6*2**30, '512MB', plain byte counts; returns bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if unit is not None and unit in ("K", "M", "G", "T"):
        unit += "B"
    if m is None or unit not in _UNITS:
        raise UsageError(f"cannot read size {text!r}: use a number with a unit, like 6GB, 6GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """Bytes as a short human string in decimal units ('1.53 GB')."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
