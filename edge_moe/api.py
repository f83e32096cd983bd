"""The Python surface: load() a model file and generate, stream or score text with it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from edge_moe.config import ModelConfig, parse_size
from edge_moe.errors import FormatError, UsageError
from edge_moe.format.container import Container
from edge_moe.format.layout import build_layout
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.kernels import get_backend
from edge_moe.model.decoder import Decoder
from edge_moe.model.weights import expert_shapes
from edge_moe.runtime.expert_store import ExpertStore
from edge_moe.runtime.moe import MoeDispatch
from edge_moe.runtime.sampling import sample

DEMO_MODEL = Path(__file__).parent / "data" / "demo.emoe"


def _dense_weights(container: Container, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, entry in container.manifest["dense"].items():
        raw = torch.from_numpy(container.read_dense(name)).view(torch.bfloat16)
        out[name] = raw.reshape(entry["shape"]).to(dtype)
    return out


def _tokenizer(container: Container) -> Tokenizer | None:
    data = container.read_file("tokenizer.json")
    return Tokenizer.from_str(data.decode()) if data else None


def _eos_ids(container: Container, tok: Tokenizer | None) -> set[int]:
    gen = json.loads(container.read_file("generation_config.json") or b"{}")
    eos = gen.get("eos_token_id")
    if eos is None and tok is not None:
        name = json.loads(container.read_file("tokenizer_config.json") or b"{}").get("eos_token")
        eos = tok.token_to_id(name) if isinstance(name, str) else None
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def _check_bits(bits: int | None) -> int:
    bits = MAX_BITS if bits is None else int(bits)
    if not BASE_BITS <= bits <= MAX_BITS:
        raise UsageError(f"bits={bits} is out of range; choose {BASE_BITS}..{MAX_BITS}")
    return bits


class Model:
    """A loaded .emoe model: dense part resident, experts read by level on demand."""

    def __init__(self, path: str | Path, memory_budget=None, device: str = "cpu",
                 backend: str = "reference", dense_dtype: torch.dtype = torch.float32):
        if device != "cpu":
            raise UsageError(f"device {device!r} is not supported yet; use device='cpu'")
        self.path = Path(path)
        self.memory_budget = None if memory_budget is None else parse_size(memory_budget)
        self.container = Container(self.path)
        m = self.container.manifest
        self.config = ModelConfig.from_dict(m["model"])
        self.layout = build_layout(expert_shapes(self.config), m["quant"]["scheme"], m["quant"]["group"])
        if list(self.layout.level_ends) != m["expert_layout"]["level_ends"]:
            raise FormatError(f"{self.path}: expert layout does not match this edge-moe version")
        self.tokenizer = _tokenizer(self.container)
        self.eos_ids = _eos_ids(self.container, self.tokenizer)
        self.store = ExpertStore(self.container)
        self.dispatch = MoeDispatch(self.store, self.layout, get_backend(backend))
        self.decoder = Decoder(self.config, _dense_weights(self.container, dense_dtype), self.dispatch)
        self.stats: dict = {}

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.path} carries no tokenizer.json; pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def logits(self, token_ids, bits: int | None = None) -> np.ndarray:
        """Full-sequence forward: logits [T, V] float32 for every position."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        self.dispatch.bits = _check_bits(bits)
        cache = self.decoder.new_cache(len(ids))
        return self.decoder.forward(ids, cache, all_logits=True).numpy()

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64, bits: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
        """Yield new token ids one by one (prefill the prompt, then decode)."""
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        self.dispatch.bits = _check_bits(bits)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = self.decoder.new_cache(len(prompt_ids) + max_tokens)
        t0, n = time.perf_counter(), 0
        logits = self.decoder.forward(torch.tensor(prompt_ids), cache)[-1]
        self.stats = {"prompt_tokens": len(prompt_ids), "prefill_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        for n in range(1, max_tokens + 1):
            token = sample(logits, temperature, top_p, gen)
            yield token
            if token in self.eos_ids or n == max_tokens:
                break
            logits = self.decoder.forward(torch.tensor([token]), cache)[-1]
        decode_s = time.perf_counter() - t1
        self.stats.update({"new_tokens": n, "decode_s": decode_s,
                           "decode_tokens_per_s": n / decode_s if decode_s > 0 else 0.0,
                           "expert_bytes_read": self.store.bytes_read})

    def stream(self, prompt: str, max_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield text pieces as tokens are generated (whole UTF-8 characters only)."""
        ids, emitted = [], ""
        for token in self.generate_ids(self.encode(prompt), max_tokens, **kwargs):
            if token in self.eos_ids:
                break
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text

    def generate(self, prompt: str, max_tokens: int = 64, **kwargs) -> str:
        return "".join(self.stream(prompt, max_tokens, **kwargs))

    def close(self) -> None:
        self.container.close()


def load(model: str | Path | None = None, memory_budget=None, device: str = "cpu", **kwargs) -> Model:
    """Open an .emoe file; with no model, the demo model shipped inside the package."""
    path = DEMO_MODEL if model is None else Path(model)
    if model is None and not path.is_file():
        raise FormatError(f"the demo model {path} is missing from this installation")
    return Model(path, memory_budget=memory_budget, device=device, **kwargs)


def describe(model: str | Path | None = None) -> dict:
    """What `edge-moe inspect` prints: architecture, parameter counts and bytes per bit width."""
    path = DEMO_MODEL if model is None else Path(model)
    with Container(path) as c:
        m = c.manifest
    cfg = ModelConfig.from_dict(m["model"])
    layout = build_layout(expert_shapes(cfg), m["quant"]["scheme"], m["quant"]["group"])
    dense_params = sum(int(np.prod(e["shape"])) for e in m["dense"].values())
    n_experts = len(cfg.moe_layers) * cfg.num_experts
    expert_params = n_experts * sum(o * n for _, (o, n) in layout.matrices)
    return {
        "path": str(path), "model_type": cfg.model_type, "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "experts": cfg.num_experts, "top_k": cfg.top_k,
        "moe_layers": len(cfg.moe_layers), "scheme": m["quant"]["scheme"], "group": m["quant"]["group"],
        "dense_params": dense_params, "expert_params": expert_params,
        "dense_bytes": sum(e["nbytes"] for e in m["dense"].values()),
        "expert_bytes_by_bits": {b: n_experts * layout.bytes_for_bits(b)
                                 for b in range(BASE_BITS, MAX_BITS + 1)},
        "active_expert_params_per_token": len(cfg.moe_layers) * cfg.top_k * expert_params // max(n_experts, 1),
    }
