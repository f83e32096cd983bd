"""The Python surface: load() a model file and generate, stream or score text with it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
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
from edge_moe.kernels.warm import prepare as prepare_cpu_kernels
from edge_moe.model.decoder import Decoder
from edge_moe.model.layers import KVCache
from edge_moe.model.packed import check_dense_bits, pack_linear, packs
from edge_moe.model.weights import expert_shapes, qkv_part
from edge_moe.runtime.arena import DeviceArena, HostArena
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.expert_cache import ExpertCache
from edge_moe.runtime.memory import GPU_MIN_MARGIN, MemoryPlan, PeakRss, current_rss, plan_memory, trim_heap
from edge_moe.runtime.moe import STREAMING, MoePipeline, default_streaming
from edge_moe.runtime.reader import Reader
from edge_moe.runtime.sampling import sample
from edge_moe.runtime.stats import RunStats

DEMO_MODEL = Path(__file__).parent / "data" / "demo.emoe"


def _dense_weights(container: Container, dtype: torch.dtype, bits: int, backend) -> dict:
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


SMALL_HIDDEN = 1024


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def default_backend(device: torch.device) -> str:
    """The fast kernels for the device (the reference ops stay available by name)."""
    return "cuda" if device.type == "cuda" else "cpu"


def _set_threads(threads: int | None, cfg: ModelConfig) -> None:
    """torch's intra-op threads: given, or 1 for small models, whose tiny ops only pay for thread
    barriers (measured 16 vs 452 ms/token on the demo model with both cores busy elsewhere)."""
    if threads is None and cfg.hidden_size < SMALL_HIDDEN:
        threads = 1
    if threads is not None:
        torch.set_num_threads(int(threads))


def _rewrite(kernels, layout, arena, resident: bool):
    """The cache's rewrite and whether it has the LUT form: experts run at 3-4 bits into the cpu kernels'
    nibble form (runtime.moe.NIBBLE_BITS), experts run only at 2 bits into their LUT form, where the
    kernels have them and every chunk stays resident. Streamed experts keep the file's planes: their
    time goes to reads, and there is no way back once chunk 3 is evicted."""
    if resident and isinstance(arena, HostArena) and getattr(kernels, "nibble_form", None) \
            and kernels.nibble_form(layout):
        return partial(kernels.rewrite_form, layout, arena.data), kernels.lut_form(layout)
    return None, False


class Model:
    """A loaded .emoe model: dense part resident, experts streamed by level through a budgeted cache."""

    def __init__(self, path: str | Path, memory_budget=None, device: str = "cpu", backend: str | None = None,
                 dense_dtype: torch.dtype = torch.bfloat16, max_context: int = 2048, prefill_chunk: int = 32,
                 drop_page_cache: bool = False, verify: bool = True, streaming: str | None = None,
                 threads: int | None = None, gpu_memory_budget=None, dense_bits: int | None = None):
        """dense_bits: 4..8 packs the projections and LM head (cpu; default 8): byte or nibble codes at 8
        and 4, nested bit-planes at 5-7; 16 keeps them in `dense_dtype` (the default on cuda).
        streaming: a name of runtime.moe.STREAMING; default HEBF, with next-layer prefetch where there
        are cores to spare (default_streaming)."""
        self.device = _check_device(device)
        backend = backend or default_backend(self.device)
        kernels = get_backend(backend)  # import (and load numba) before measuring the baseline
        prepare_cpu_kernels()  # every backend's bookkeeping is numba: compiled in a child process the
        # first time, so LLVM's memory stays out of the budget
        self.dense_bits = check_dense_bits(dense_bits if dense_bits is not None
                                           else 16 if self.device.type == "cuda" else 8)
        if self.dense_bits < 16 and self.device.type == "cuda":
            raise UsageError("packed dense weights run on the cpu only; use --dense-bits 16 with --device cuda")
        baseline = current_rss()
        self.rss = PeakRss()
        self.path, self.prefill_chunk = Path(path), int(prefill_chunk)
        self.container = Container(self.path, drop_page_cache=drop_page_cache)
        m = self.container.manifest
        self.config = cfg = ModelConfig.from_dict(m["model"])
        self.max_context = min(int(max_context), cfg.max_position_embeddings)
        self.layout = build_layout(expert_shapes(cfg), m["quant"]["scheme"], m["quant"]["group"])
        if self.layout.to_dict() != m["expert_layout"]:
            raise FormatError(f"{self.path}: its expert layout differs from this edge-moe version's; "
                              "convert the checkpoint again")
        _set_threads(threads, cfg)
        self.tokenizer = _tokenizer(self.container)
        self.eos_ids = _eos_ids(self.container, self.tokenizer)
        dense = _dense_weights(self.container, dense_dtype, self.dense_bits, kernels)
        trim_heap()
        self.memory_plan = self._plan(memory_budget, dense, baseline)
        units = self.memory_plan.cache_units if self.memory_plan else len(cfg.moe_layers) * cfg.num_experts * 8
        if self.device.type == "cuda":
            dense = {k: v.to(self.device) for k, v in dense.items()}
            units = self._gpu_units(gpu_memory_budget, dense)
        streaming = streaming or default_streaming()
        if streaming not in STREAMING:
            raise UsageError(f"streaming={streaming!r} is unknown; choose one of {', '.join(STREAMING)}")
        eviction, prefetch, keep = STREAMING[streaming]
        arena = (DeviceArena(units, self.layout.unit_bytes, self.device) if self.device.type == "cuda"
                 else HostArena(units, self.layout.unit_bytes))
        every_level = len(cfg.moe_layers) * cfg.num_experts * MAX_BITS
        rewrite, lut = _rewrite(kernels, self.layout, arena, keep and units >= every_level)
        self.cache = ExpertCache(self.layout, arena, list(cfg.moe_layers), cfg.num_experts, eviction=eviction,
                                 rewrite=rewrite, lut=lut)
        self.reader = Reader(self.container, self.cache, verify=verify)
        if prefetch and memory_budget is not None and len(arena) >= every_level:
            self.reader.fill()  # speculative reads are on and the budget holds every level: read them all
        routers = {li: dense[f"layers.{li}.router"] for li in cfg.moe_layers}
        self.pipeline = MoePipeline(cfg, self.cache, self.reader, kernels, routers,
                                    prefetch=prefetch, keep=keep)
        self.decoder = Decoder(cfg, dense, self.pipeline)
        self.stats: dict = {}

    def _plan(self, memory_budget, dense: dict, baseline: int) -> MemoryPlan | None:
        if memory_budget is None:
            return None
        cfg = self.config
        kv = KVCache.bytes_for(cfg, self.max_context)
        return plan_memory(parse_size(memory_budget), cfg, sum(t.nbytes for t in dense.values()), kv,
                           self.layout.unit_bytes, self.prefill_chunk, self.max_context, baseline)

    def _gpu_units(self, gpu_memory_budget, dense: dict) -> int:
        """Expert units that fit in VRAM: all of them, or what --gpu-memory-budget leaves."""
        cfg, unit = self.config, self.layout.unit_bytes
        everything = len(cfg.moe_layers) * cfg.num_experts * 8
        if gpu_memory_budget is None:
            return everything
        kv = KVCache.bytes_for(cfg, self.max_context)
        plan = plan_memory(parse_size(gpu_memory_budget), cfg, sum(t.nbytes for t in dense.values()), kv,
                           unit, self.prefill_chunk, self.max_context, baseline=0, what="--gpu-memory-budget",
                           min_margin=GPU_MIN_MARGIN)
        self.gpu_memory_plan = plan
        return min(plan.cache_units, everything)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.path} carries no tokenizer.json; pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def _start(self, n_tokens: int, knobs: dict) -> KVCache:
        if n_tokens > self.max_context:
            raise UsageError(f"{n_tokens} tokens exceed the context of {self.max_context}; "
                             "raise --max-context or shorten the prompt / --max-tokens")
        self.pipeline.request = BitRequest.make(**knobs)
        with self.cache.lock:  # below min_bits an expert is useless: keep or drop those chunks together
            self.cache.floor = max(2, self.pipeline.request.min_bits)
        self.pipeline.stats = RunStats()
        self._bytes0, self._read_s0 = self.reader.bytes_read, self.reader.read_seconds
        self.rss.reset()
        return self.decoder.new_cache(n_tokens)

    def _prefill(self, ids: list[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        outs = [self.decoder.forward(torch.tensor(ids[i:i + self.prefill_chunk]), cache, all_logits)
                for i in range(0, len(ids), self.prefill_chunk)]
        return torch.cat(outs) if all_logits else outs[-1]

    def logits(self, token_ids, bits: int | None = None, **knobs) -> np.ndarray:
        """Full-sequence forward: logits [T, V] float32 for every position."""
        ids = [int(t) for t in token_ids]
        cache = self._start(len(ids), {"bits": bits, **knobs})
        out = self._prefill(ids, cache, all_logits=True).numpy()
        self.stats = {"prompt_tokens": len(ids), **self.pipeline.stats.as_dict(),
                      "bytes_read": self.reader.bytes_read - self._bytes0, "peak_rss": self.rss.peak,
                      "peak_rss_process": self.rss.process_peak}
        return out

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64, bits: int | None = None,
                     quality: float | None = None, min_bits: int | None = None, max_bits: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     wait: bool | None = None) -> Iterator[int]:
        """Yield new token ids one by one (prefill the prompt, then decode)."""
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        cache = self._start(len(prompt_ids) + max_tokens,
                            {"bits": bits, "quality": quality, "min_bits": min_bits, "max_bits": max_bits,
                             "wait": wait})
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        t0 = time.perf_counter()
        logits = self._prefill(list(prompt_ids), cache)[-1]
        t1, n = time.perf_counter(), 0
        for n in range(1, max_tokens + 1):
            token = sample(logits, temperature, top_p, gen)
            yield token
            if token in self.eos_ids or n == max_tokens:
                break
            logits = self.decoder.forward(torch.tensor([token]), cache)[-1]
        self._record(len(prompt_ids), n, t1 - t0, time.perf_counter() - t1)

    def _record(self, prompt: int, new: int, prefill_s: float, decode_s: float) -> None:
        read = self.reader.bytes_read - self._bytes0
        self.stats = {"prompt_tokens": prompt, "new_tokens": new, "prefill_s": prefill_s, "decode_s": decode_s,
                      # the first new token comes from the prefill's logits: n tokens, n - 1 decode steps
                      "decode_tokens_per_s": (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
                      **self.pipeline.stats.as_dict(),
                      "stall_fraction": self.pipeline.stats.stall_s / max(prefill_s + decode_s, 1e-9),
                      "bytes_read": read, "bytes_read_per_token": read / max(prompt + new, 1),
                      "read_s": self.reader.read_seconds - self._read_s0,  # the reader thread's time in reads
                      "peak_rss": self.rss.peak, "peak_rss_process": self.rss.process_peak,
                      "memory_budget": self.memory_plan.budget if self.memory_plan else None}

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
        self.reader.close()
        self.rss.stop()
        self.container.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
