"""Reading a model file's parts into memory: its config and expert layout, dense weights, tokenizer."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from tokenizers import Tokenizer

from edge_moe.config import ModelConfig
from edge_moe.errors import FormatError
from edge_moe.format.container import Container
from edge_moe.format.layout import ExpertLayout, build_layout
from edge_moe.model.packed import pack_linear, packed_nbytes, packs
from edge_moe.model.weights import dense_shapes, expert_shapes, qkv_part


def read_model(container: Container) -> tuple[ModelConfig, ExpertLayout]:
    """The config and expert layout the file declares, checked against its tensors; refused if this
    version lays experts out otherwise."""
    m, path = container.manifest, container.path
    cfg = _config(m["model"], path)
    try:
        layout = build_layout(expert_shapes(cfg), m["quant"].get("scheme"), m["quant"].get("group"))
    except (TypeError, ValueError):
        raise FormatError(f"{path}: its quantization {m['quant']} is not one this edge-moe reads") from None
    if layout.to_dict() != m["expert_layout"]:
        raise FormatError(f"{path}: its expert layout differs from this edge-moe version's; "
                          "convert the checkpoint again")
    want = {name: list(shape) for name, shape in dense_shapes(cfg).items()}
    have = {name: entry["shape"] for name, entry in m["dense"].items()}
    if want != have:
        name = next(n for n in sorted(want.keys() | have.keys()) if want.get(n) != have.get(n))
        raise FormatError(f"{path}: dense tensor {name} is {have.get(name, 'missing')}, the model's config "
                          f"says {want.get(name, 'no such tensor')}; the file is corrupt")
    if m["experts"]["layers"] != list(cfg.moe_layers) or \
            any(len(row) != cfg.num_experts for row in m["experts"]["offsets"]):
        raise FormatError(f"{path}: its expert table does not match the config's MoE layers and experts")
    return cfg, layout


def _config(d: dict, path) -> ModelConfig:
    """The manifest's model config, every field of its declared type and every size positive."""
    try:
        cfg = ModelConfig.from_dict(d)
    except TypeError:
        raise FormatError(f"{path}: the model config lacks a field or has an unknown one") from None
    for f in dataclasses.fields(cfg):
        if not _valid(f.name, f.type, getattr(cfg, f.name), cfg):
            value = str(getattr(cfg, f.name))[:80]
            raise FormatError(f"{path}: model config field {f.name} = {value!r} is invalid; the file is "
                              "corrupt")
    if cfg.num_heads % cfg.num_kv_heads or cfg.top_k > cfg.num_experts or cfg.qk_norm not in QK_NORMS:
        raise FormatError(f"{path}: the model config's heads, top-k or qk_norm are inconsistent; the file is "
                          "corrupt")
    return cfg


def _valid(name: str, kind: str, value, cfg: ModelConfig) -> bool:
    """A config field holds a value of its declared type (sizes positive, floats finite and positive)."""
    if kind == "int":
        return type(value) is int and (value > 0 or (value == 0 and name in ZERO_OK))
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value) and value > 0
    if kind in ("bool", "str"):
        return type(value).__name__ == kind
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "tuple[int, ...]":
        return all(type(v) is int and 0 <= v < cfg.num_layers for v in value)
    return True


ZERO_OK = ("shared_expert_intermediate_size", "intermediate_size")  # 0: none
QK_NORMS = ("none", "head", "full")


class _FileRows:
    """A 2-D dense matrix in the file, read a block of rows at a time (what pack_linear slices): one
    tensor, or a layer's q, k and v stacked. Each part's checksum is verified first, a chunk at a time,
    so no moment of loading holds a whole bf16 matrix."""

    def __init__(self, container: Container, names: list[str]):
        self.container, self.names = container, names
        shapes = [container.manifest["dense"][n]["shape"] for n in names]
        self.starts = np.cumsum([0] + [s[0] for s in shapes])
        self.shape = (int(self.starts[-1]), int(shapes[0][1]))
        for name in names:
            container.verify_dense(name)

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, _ = rows.indices(self.shape[0])
        pieces, row_bytes = [], 2 * self.shape[1]
        for name, lo, hi in zip(self.names, self.starts[:-1], self.starts[1:], strict=True):
            a, b = max(r0, lo), min(r1, hi)
            if a < b:
                raw = self.container.read_dense_range(name, int(a - lo) * row_bytes, int(b - lo) * row_bytes)
                pieces.append(bf16_to_f32(raw).reshape(b - a, self.shape[1]))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values held as bytes (the file's dense dtype) -> float32, exactly (numpy has no bfloat16)."""
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _fused_names(names) -> dict[str, list[str]]:
    """Each tensor the model holds and the file tensors it is made of (a layer's q, k, v: one qkv)."""
    fused: dict[str, list[str]] = {}
    for name in names:
        part = qkv_part(name)
        fused.setdefault(part[0] if part else name, []).append(name)
    return fused


def dense_nbytes(container: Container, itemsize: int, bits: int) -> int:
    """What dense_weights will hold, from the manifest alone (the plan is made before the first weight)."""
    return held_nbytes({name: e["shape"] for name, e in container.manifest["dense"].items()}, itemsize, bits)


def held_nbytes(shapes: dict, itemsize: int, bits: int) -> int:
    """Bytes of dense tensors of these file shapes as dense_weights holds them (q, k, v fused; packed at
    bits < 16; routers float32, the rest `itemsize` bytes a value)."""
    total = 0
    for name, parts in _fused_names(shapes).items():
        shape = [sum(shapes[p][0] for p in parts), *shapes[parts[0]][1:]]
        numel = int(np.prod(shape))
        if bits < 16 and packs(name):
            total += packed_nbytes((shape[0], shape[1]), bits)
        else:
            total += numel * (4 if name.endswith(".router") else itemsize)
    return total


def dense_weights(container: Container, bits: int, backend, place=None) -> dict:
    """Dense tensors as float32 numpy arrays, or what `place(array, name)` makes of each (cuda: a tensor on
    the GPU, one at a time), given bf16 values as uint16 [shape], and routers as float32: their top-k
    decides everything downstream. With bits < 16 the embedding, projections and LM head are packed as
    they are read, a block of rows at a time. A layer's q, k and v (and their biases) become one `qkv`."""
    out = {}
    for name, parts in _fused_names(container.manifest["dense"]).items():
        if len(parts) not in (1, 3):
            raise FormatError(f"{container.path}: {name} lacks one of q, k and v")
        parts = sorted(parts, key=lambda p: qkv_part(p)[1]) if len(parts) == 3 else parts
        if bits < 16 and packs(name):
            out[name] = pack_linear(_FileRows(container, parts), bits, backend)
            continue
        raws = [container.read_dense(p).view(np.uint16).reshape(container.manifest["dense"][p]["shape"])
                for p in parts]
        raw = raws[0] if len(raws) == 1 else np.concatenate(raws)
        value = bf16_to_f32(raw) if place is None or name.endswith(".router") else raw
        out[name] = value if place is None else place(value, name)
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


def _tokenizer_config(container: Container) -> dict:
    try:
        cfg = json.loads(container.read_file("tokenizer_config.json") or b"{}")
    except ValueError:
        raise FormatError(f"{container.path}: its tokenizer_config.json is not JSON") from None
    return cfg if isinstance(cfg, dict) else {}


def chat_template(container: Container) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's (the one named
    "default" where it holds several), or None."""
    data = container.read_file("chat_template.jinja")
    if data:
        return data.decode()
    template = _tokenizer_config(container).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def special_tokens(container: Container) -> dict[str, str]:
    """bos_token, eos_token, unk_token and pad_token as text (what chat templates read)."""
    cfg, out = _tokenizer_config(container), {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out
