"""Reading a model file's parts into memory: its config and expert layout, dense weights, tokenizer."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer

from edge_moe.config import ModelConfig
from edge_moe.errors import FormatError
from edge_moe.format.container import Container
from edge_moe.format.layout import ExpertLayout, build_layout
from edge_moe.model.packed import pack_linear, packs
from edge_moe.model.weights import expert_shapes, qkv_part


def read_model(container: Container) -> tuple[ModelConfig, ExpertLayout]:
    """The config and expert layout the file declares; refused if this version lays experts out otherwise."""
    m = container.manifest
    cfg = ModelConfig.from_dict(m["model"])
    layout = build_layout(expert_shapes(cfg), m["quant"]["scheme"], m["quant"]["group"])
    if layout.to_dict() != m["expert_layout"]:
        raise FormatError(f"{container.path}: its expert layout differs from this edge-moe version's; "
                          "convert the checkpoint again")
    return cfg, layout


def dense_weights(container: Container, dtype: torch.dtype, bits: int, backend) -> dict:
    """Dense tensors in `dtype`; with bits < 16 the embedding, projections and LM head are packed one
    by one as they are read. A layer's q, k and v (and their biases) become one `qkv` tensor. Routers
    are float32: their top-k decides everything downstream, and a float32 GEMV of [E, D] is ~4x
    faster on the cpu than torch's bf16 one."""
    out, parts = {}, {}
    for name, entry in container.manifest["dense"].items():
        raw = torch.from_numpy(container.read_dense(name)).view(torch.bfloat16).reshape(entry["shape"])
        if (part := qkv_part(name)) is not None:
            name, i = part
            parts.setdefault(name, {})[i] = raw
            if len(parts[name]) < 3:
                continue
            group = parts.pop(name)
            raw = torch.cat([group[j] for j in range(3)])
        out[name] = (pack_linear(raw, bits, backend) if bits < 16 and packs(name)
                     else raw.float() if name.endswith(".router") else raw.to(dtype))
    if parts:
        raise FormatError(f"{container.path}: {', '.join(parts)} lack one of q, k and v")
    return out


def tokenizer(container: Container) -> Tokenizer | None:
    """The file's tokenizer.json, or None when it carries none (token ids only)."""
    data = container.read_file("tokenizer.json")
    return Tokenizer.from_str(data.decode()) if data else None


def eos_ids(container: Container, tok: Tokenizer | None) -> set[int]:
    """Ids that end generation: generation_config's eos_token_id, else tokenizer_config's eos_token."""
    gen = json.loads(container.read_file("generation_config.json") or b"{}")
    eos = gen.get("eos_token_id")
    if eos is None and tok is not None:
        name = json.loads(container.read_file("tokenizer_config.json") or b"{}").get("eos_token")
        eos = tok.token_to_id(name) if isinstance(name, str) else None
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
