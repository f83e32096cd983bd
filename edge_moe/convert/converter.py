"""HF checkpoint -> .emoe: resolve names through the adapter, then stream tensor by tensor, atomically."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_moe import __version__
from edge_moe.config import ModelConfig
from edge_moe.convert.hf_source import HFCheckpoint
from edge_moe.errors import CheckpointError, UsageError
from edge_moe.format.container import ContainerWriter, plan
from edge_moe.format.layout import ExpertLayout, build_layout, pack_expert
from edge_moe.format.nested import BASE_BITS, MAX_BITS, SCHEMES, WORD_BITS, quantize
from edge_moe.model.adapters import Adapter, get_adapter
from edge_moe.model.weights import dense_shapes, expert_shapes

CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja")
DEFAULT_SCHEME = "msb"


def _resolve_dense(ckpt: HFCheckpoint, adapter: Adapter, cfg: ModelConfig) -> dict[str, list[str]]:
    """Internal name -> HF names (concatenated on dim 0), shapes checked against the config."""
    out = {}
    for name, shape in dense_shapes(cfg).items():
        cands = adapter.candidates(name)
        found = next((c for c in cands if all(ckpt.has(n) for n in c)), None)
        if found is None:
            raise CheckpointError(f"{ckpt.path}: tensor {cands[0][0]} is missing (needed for {name})")
        rows = shape[0] // len(found)
        for n in found:
            ckpt.check(n, (rows, *shape[1:]))
        out[name] = found
    return out


def _expert_names(ckpt: HFCheckpoint, adapter: Adapter, cfg: ModelConfig, layer: int) -> dict:
    """{'gate'/'up'/'down': template} for per-expert tensors, or {'fused': {...}} for 3-D tensors."""
    i, d = cfg.moe_intermediate_size, cfg.hidden_size
    fused = {k: v.format(layer=layer) for k, v in adapter.fused_experts.items()}
    if all(ckpt.has(n) for n in fused.values()):
        ckpt.check(fused["gate_up"], (cfg.num_experts, 2 * i, d))
        ckpt.check(fused["down"], (cfg.num_experts, d, i))
        return {"fused": fused}
    shapes = {"gate": (i, d), "up": (i, d), "down": (d, i)}
    for e in range(cfg.num_experts):
        for proj, tmpl in adapter.per_expert.items():
            ckpt.check(tmpl.format(layer=layer, expert=e), shapes[proj])
    return {proj: tmpl for proj, tmpl in adapter.per_expert.items()}


def _expert_matrices(ckpt: HFCheckpoint, names: dict, layer: int, e: int) -> dict[str, torch.Tensor]:
    if "fused" in names:
        return {"gate_up": ckpt.get(names["fused"]["gate_up"], e), "down": ckpt.get(names["fused"]["down"], e)}
    get = lambda p: ckpt.get(names[p].format(layer=layer, expert=e))  # noqa: E731
    return {"gate_up": torch.cat([get("gate"), get("up")]), "down": get("down")}


def _quantized_expert(layout: ExpertLayout, mats: dict[str, torch.Tensor]) -> bytes:
    q = {k: quantize(v.float().numpy(), layout.scheme, layout.group) for k, v in mats.items()}
    return pack_expert(layout, q)


def _bf16_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; give a Hugging Face checkpoint folder (config.json, "
                         "*.safetensors)")
    if dst.is_dir():
        raise UsageError(f"{dst} is a directory; give the output file's name, e.g. {dst / 'model.emoe'}")
    if not dst.parent.is_dir():
        raise UsageError(f"the folder {dst.parent} does not exist; create it or write elsewhere")
    if dst.exists() and not force:
        raise UsageError(f"{dst} exists; pass --force to overwrite it")
    if dst.resolve().is_relative_to(src.resolve()):
        raise UsageError(f"{dst} is inside the source checkpoint {src}; write it elsewhere")


def _manifest(ckpt, cfg, dense, layout, files) -> dict:
    base = {"format": "edge-moe", "version": 1, "created_by": f"edge-moe {__version__}",
            "model": cfg.to_dict(), "hf_config": ckpt.config,
            "quant": {"scheme": layout.scheme, "group": layout.group,
                      "base_bits": BASE_BITS, "max_bits": MAX_BITS},
            "expert_layout": layout.to_dict()}
    specs = {n: {"shape": list(s), "dtype": "bfloat16", "nbytes": 2 * int(np.prod(s))}
             for n, s in dense_shapes(cfg).items()}
    return plan(base, specs, {k: len(v) for k, v in files.items()}, list(cfg.moe_layers),
                cfg.num_experts, list(layout.level_ends))


def convert(src: str | Path, dst: str | Path, scheme: str = DEFAULT_SCHEME, group: int = 128,
            force: bool = False, progress: bool = True) -> Path:
    """Convert the HF checkpoint dir `src` into the .emoe file `dst`; returns dst."""
    src, dst = Path(src), Path(dst)
    if scheme not in SCHEMES:
        raise UsageError(f"--scheme {scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if group <= 0 or group % WORD_BITS:
        raise UsageError(f"--group {group}: the group size must be a positive multiple of {WORD_BITS} "
                         "(default 128)")
    _check_paths(src, dst, force)
    ckpt = HFCheckpoint(src)
    adapter = get_adapter(ckpt.config.get("model_type"))
    cfg = adapter.config(ckpt.config)
    dense = _resolve_dense(ckpt, adapter, cfg)
    experts = {li: _expert_names(ckpt, adapter, cfg, li) for li in cfg.moe_layers}
    layout = build_layout(expert_shapes(cfg), scheme, group)
    files = {n: (src / n).read_bytes() for n in CARRIED_FILES if (src / n).is_file()}
    if "tokenizer.json" not in files:
        warnings.warn(f"{src} has no tokenizer.json: the model file will take token ids only (Python API), "
                      "not text (`edge-moe run --prompt`)", NoTokenizerWarning, stacklevel=2)
    _remove_stale_temps(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = ContainerWriter(tmp, _manifest(ckpt, cfg, dense, layout, files))
    try:
        _write_all(writer, ckpt, cfg, dense, experts, layout, files, progress)
        writer.finish()
        os.replace(tmp, dst)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dst


class NoTokenizerWarning(UserWarning):
    """The checkpoint carries no tokenizer: the model file takes token ids only."""


def _remove_stale_temps(dst: Path) -> None:
    """Temporary files of earlier conversions to dst whose process is gone (killed with SIGKILL)."""
    for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_all(writer, ckpt, cfg, dense, experts, layout, files, progress) -> None:
    for name, data in files.items():
        writer.write_file(name, data)
    total = len(dense) + len(experts) * cfg.num_experts
    bar = tqdm(total=total, unit="tensor", desc="converting", disable=not progress)
    for name, hf_names in dense.items():
        writer.write_dense(name, _bf16_bytes(torch.cat([ckpt.get(n) for n in hf_names])))
        bar.update()
    ckpt.release()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for row, (li, names) in enumerate(experts.items()):
            def one(e, li=li, names=names):
                return _quantized_expert(layout, _expert_matrices(ckpt, names, li, e))
            for e, data in enumerate(pool.map(one, range(cfg.num_experts))):
                writer.write_expert(row, e, data)
                bar.update()
            ckpt.release()  # unmap this layer's shard pages before the next layer
    bar.close()
