"""The Python surface: load() a model file and generate, stream or score text with it."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from edge_moe.config import CPU_DENSE_BITS, format_size, parse_size
from edge_moe.errors import BudgetError, BudgetWarning, FormatError, UsageError
from edge_moe.format.container import Container
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.kernels import get_backend
from edge_moe.model import host_layers
from edge_moe.model.decoder import Decoder
from edge_moe.model.load import (
    chat_template,
    dense_nbytes,
    dense_weights,
    eos_ids,
    read_model,
    special_tokens,
    tokenizer,
)
from edge_moe.model.packed import check_dense_bits
from edge_moe.runtime.arena import DeviceArena, HostArena
from edge_moe.runtime.batch import Batcher, Request
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.chat import render
from edge_moe.runtime.expert_cache import ExpertCache
from edge_moe.runtime.generate import prefill
from edge_moe.runtime.memory import (
    GPU_MIN_MARGIN,
    MemoryPlan,
    PeakRss,
    current_rss,
    plan_memory,
    release_code_pages,
    trim_heap,
)
from edge_moe.runtime.moe import STREAMING, Call, MoePipeline, default_streaming
from edge_moe.runtime.reader import Reader, Want
from edge_moe.runtime.sampling import check_sampling, generator, sample
from edge_moe.runtime.warm import groups_for as kernel_groups
from edge_moe.runtime.warm import prepare as prepare_kernels

DEMO_MODEL = Path(__file__).parent / "data" / "demo.emoe"


def _check_device(device: str) -> str:
    """'cpu', or 'cuda' ('cuda:N') when torch sees a GPU; torch is imported for cuda only."""
    name = str(device)
    if name != "cpu" and name.split(":")[0] != "cuda":
        raise UsageError(f"device {device!r} is not supported; use cpu or cuda")
    if name != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return name


def default_backend(on_cuda: bool) -> str:
    """The fast kernels for the device (the reference ops stay available by name)."""
    return "cuda" if on_cuda else "cpu"


def _threads(threads: int | None, on_cuda: bool):
    """A callable that sets the compute threads of the calling thread (numba's count is per thread; torch's
    on cuda is global), or None for the default: every core."""
    if threads is None:
        return None
    if on_cuda:
        import torch

        torch.set_num_threads(int(threads))
        return None
    from numba import config, set_num_threads

    if not 1 <= int(threads) <= config.NUMBA_NUM_THREADS:
        raise UsageError(f"threads={threads}: use 1..{config.NUMBA_NUM_THREADS}")
    return partial(set_num_threads, int(threads))


def _positive(name: str, value, zero: bool = False) -> int:
    if type(value) is not int or value < (0 if zero else 1):
        raise UsageError(f"{name}={value!r}: use a whole number of {0 if zero else 1} or more")
    return value


def _dense_bits(bits: int | None, on_cuda: bool) -> int:
    """--dense-bits, checked: default 8 on the cpu, 16 (the file's bf16) on cuda, which packs nothing."""
    bits = check_dense_bits(bits if bits is not None else 16 if on_cuda else CPU_DENSE_BITS)
    if bits < 16 and on_cuda:
        raise UsageError("packed dense weights run on the cpu only; use --dense-bits 16 with --device cuda")
    return bits


def _dense_dtype(dtype, on_cuda: bool):
    """The dtype of unpacked dense tensors: on cuda a torch dtype (default bfloat16, the file's), on the
    cpu float32 only (numpy has no bfloat16)."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if not on_cuda:
        if name not in (None, "float32"):
            raise UsageError(f"dense_dtype={dtype}: the cpu holds unpacked dense tensors as float32")
        return None
    import torch

    if name not in (None, "bfloat16", "float16", "float32"):
        raise UsageError(f"dense_dtype={dtype}: use bfloat16, float16 or float32")
    return getattr(torch, name or "bfloat16")


def _streaming(name: str | None) -> tuple[str, bool, bool]:
    """(eviction, speculative reads, keep experts after use) of a name of runtime.moe.STREAMING."""
    name = name or default_streaming()
    if name not in STREAMING:
        raise UsageError(f"streaming={name!r} is unknown; choose one of {', '.join(STREAMING)}")
    return STREAMING[name]


class Model:
    """A loaded .emoe model: dense part resident, experts streamed by level through a budgeted cache.
    Calls from several threads are safe: up to max_batch generations run together, one forward per
    step over all of them (runtime.batch); up to max_queue more wait for a slot."""

    def __init__(self, path: str | Path, memory_budget=None, device: str = "cpu", backend: str | None = None,
                 dense_dtype=None, max_context: int = 2048, prefill_chunk: int = 32,
                 drop_page_cache: bool = False, verify: bool = True, streaming: str | None = None,
                 threads: int | None = None, gpu_memory_budget=None, dense_bits: int | None = None,
                 resident_forms: bool = True, max_batch: int = 1, max_queue: int = 64, trace=None):
        """dense_bits: 4..8 packs the projections and LM head (cpu; default 8): byte or nibble codes at 8
        and 4, nested bit-planes at 5-7; 16 keeps them unpacked (the default on cuda): float32 on the cpu,
        `dense_dtype` on cuda (default bfloat16). threads: the compute threads (default: every core).
        streaming: a name of runtime.moe.STREAMING; default HEBF, with next-layer prefetch where there
        are cores to spare (default_streaming). resident_forms: let the backend keep experts in its
        faster layouts when the cache holds every chunk (False: always the file's planes). max_batch:
        generations that run together, each with a KV cache of max_context tokens in the plan. trace: a
        runtime.trace.Trace that records load phases, steps, reads, computes and stalls (edge-moe profile)."""
        self.device = _check_device(device)
        self.on_cuda = on_cuda = self.device != "cpu"
        dtype = _dense_dtype(dense_dtype, on_cuda)
        # sizes checked before anything loads (parse_size takes its own output back unchanged)
        memory_budget = None if memory_budget is None else parse_size(memory_budget)
        gpu_memory_budget = None if gpu_memory_budget is None else parse_size(gpu_memory_budget)
        self.max_batch = _positive("max_batch", max_batch)
        max_queue = _positive("max_queue", max_queue, zero=True)
        backend = backend or default_backend(on_cuda)
        kernels = get_backend(backend)  # imports numba before the baseline
        self.dense_bits = _dense_bits(dense_bits, on_cuda)
        self.trace = trace
        with self._phase("kernels"):  # compiled in child processes the first time: LLVM's memory stays out
            prepare_kernels(kernel_groups(backend, self.dense_bits, resident_forms and not on_cuda))
        release_code_pages()  # LLVM's code is idle from here (runtime.memory says why this pays)
        baseline = current_rss()
        self.rss = PeakRss()
        self.path, self.prefill_chunk = Path(path), int(prefill_chunk)
        self.container = Container(self.path, drop_page_cache=drop_page_cache)
        self.config, self.layout = read_model(self.container)
        cfg = self.config
        self.max_context = min(int(max_context), cfg.max_position_embeddings)
        self._set_threads = _threads(threads, on_cuda)
        self.tokenizer = tokenizer(self.container)
        self.eos_ids = eos_ids(self.container, self.tokenizer)
        self.chat_template, self.special_tokens = chat_template(self.container), special_tokens(self.container)
        eviction, speculative, keep = _streaming(streaming)
        # the plan, and a refusal, come before the first weight is read (dense sizes from the manifest)
        dense_bytes = dense_nbytes(self.container, dtype.itemsize if on_cuda else 4, self.dense_bits)
        self.memory_plan = self._plan(memory_budget, gpu_memory_budget, dense_bytes, baseline).decide(
            speculative, keep, resident_forms and not on_cuda)
        place = self._to_device(dtype) if on_cuda else None
        with self._phase("dense weights"):
            dense = dense_weights(self.container, self.dense_bits, kernels, place)
            trim_heap()
        with self._phase("expert cache"):
            self.cache = self._cache(kernels, eviction)
        self.reader = Reader(self.container, self.cache, verify=verify)
        self.reader.trace = trace
        if self.memory_plan.fill:
            self.reader.fill()
        routers = {li: dense[f"layers.{li}.router"] for li in cfg.moe_layers}
        ops = self._layers()
        self.pipeline = MoePipeline(cfg, self.cache, self.reader, kernels, routers, ops.route,
                                    prefetch=speculative, keep=keep)
        self.decoder = Decoder(cfg, dense, self.pipeline, ops)
        self.pipeline.trace = trace
        self.stats: dict = {}
        self._step_lock = threading.Lock()  # one forward at a time: the kernels' thread pool is shared
        self.batcher = Batcher(self._forward_many, self.max_batch, max_queue, self.prefill_chunk)
        self.batcher.trace = trace
        self._calls = 0  # calls in flight: a request's peak RSS restarts only when none is
        self._warned_degraded = False

    def _phase(self, name: str):
        return self.trace.phase(name) if self.trace is not None else nullcontext()

    def _to_device(self, dtype):
        """cuda: each dense tensor to the GPU as it is read, bf16 ones in `dtype` (routers stay float32)."""
        import torch

        def place(a: np.ndarray, name: str):
            if a.dtype == np.float32:
                return torch.from_numpy(a).to(self.device)
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(self.device).to(dtype)

        return place

    def _layers(self):
        """The decoder's layers: numpy and numba on the cpu, torch on cuda."""
        if not self.on_cuda:
            return host_layers
        from edge_moe.model import torch_layers
        return torch_layers

    def _plan(self, memory_budget, gpu_memory_budget, dense_bytes: int, baseline: int) -> MemoryPlan:
        """The host plan; on cuda the cache lives in VRAM, sized by --gpu-memory-budget (or every chunk)."""
        cfg, kv = self.config, self.max_batch * host_layers.kv_bytes(self.config, self.max_context)
        budget = None if memory_budget is None else parse_size(memory_budget)
        plan = plan_memory(budget, cfg, dense_bytes, kv, self.layout.unit_bytes, self.prefill_chunk,
                           self.max_context, baseline, batch=self.max_batch)
        if not self.on_cuda:
            return plan
        gpu = None if gpu_memory_budget is None else parse_size(gpu_memory_budget)
        self.gpu_memory_plan = plan_memory(gpu, cfg, dense_bytes, kv, self.layout.unit_bytes,
                                           self.prefill_chunk, self.max_context, baseline=0,
                                           what="--gpu-memory-budget", min_margin=GPU_MIN_MARGIN,
                                           batch=self.max_batch)
        return replace(plan, cache_units=self.gpu_memory_plan.cache_units)

    def _cache(self, kernels, eviction: str) -> ExpertCache:
        cfg, units, unit_bytes = self.config, self.memory_plan.cache_units, self.layout.unit_bytes
        arena = (DeviceArena(units, unit_bytes, self.device) if self.on_cuda
                 else HostArena(units, unit_bytes))
        forms = kernels.resident_forms(self.layout, arena.data) if self.memory_plan.resident_forms else None
        return ExpertCache(self.layout, arena, list(cfg.moe_layers), cfg.num_experts, eviction=eviction,
                           forms=forms)

    def preload(self, bits: int = MAX_BITS) -> None:
        """Read every expert's levels up to `bits` now (before timing, or to work offline from the
        disk); refused when the cache cannot hold them all."""
        BitRequest.make(bits=bits)  # validates the width
        cfg, need = self.config, len(self.config.moe_layers) * self.config.num_experts * int(bits)
        if need > self.cache.n_units:
            raise BudgetError(f"preloading every expert at {bits} bits takes {need} chunks of "
                              f"{format_size(self.layout.unit_bytes)}; the cache holds {self.cache.n_units}: "
                              "raise --memory-budget or preload fewer bits")
        for layer in cfg.moe_layers:
            self.reader.submit(layer, [Want(e, int(bits), int(bits), 1.0) for e in range(cfg.num_experts)])
        self.reader.drain()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UsageError(f"{self.path} carries no tokenizer.json; pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def _forward(self, ids: list[int], kv, call: Call, all_logits: bool = False) -> np.ndarray:
        return self._forward_many([(ids, kv)], call, all_logits)

    def _forward_many(self, seqs: list, call: Call, all_logits: bool = False) -> np.ndarray:
        """One step over sequences [(ids, kv)] (Decoder.forward_many), one step of the model at a time."""
        with self._step_lock:
            if self._set_threads:
                self._set_threads()
            out = self.decoder.forward_many(seqs, call, all_logits)
            self.rss.sample()
            return out

    @contextmanager
    def _call(self, n_tokens: int, knobs: dict):
        """A request's Call and KV cache; records the model's stats when it ends."""
        if n_tokens > self.max_context:
            limit = ("raise --max-context" if self.max_context < self.config.max_position_embeddings
                     else f"this model takes at most {self.max_context} positions")
            raise UsageError(f"{n_tokens} tokens exceed the context of {self.max_context}; "
                             f"shorten the prompt or --max-tokens ({limit})")
        call = Call(BitRequest.make(**knobs))
        with self._step_lock:
            if self._calls == 0:
                self.rss.start()
            self._calls += 1
            start = {"bytes": self.reader.bytes_read, "read_s": self.reader.read_seconds}
        try:
            yield call, self.decoder.new_cache(n_tokens), start
        finally:
            with self._step_lock:
                self._calls -= 1

    def _check_ids(self, ids: list[int]) -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def logits(self, token_ids, bits: int | None = None, **knobs) -> np.ndarray:
        """Full-sequence forward: logits [T, V] float32 for every position."""
        ids = self._check_ids(token_ids)
        with self._call(len(ids), {"bits": bits, **knobs}) as (call, kv, start):
            out = prefill(self._forward, ids, kv, call, self.prefill_chunk, all_logits=True)
            self._warn_if_degraded(call)
            self.stats = {"prompt_tokens": len(ids), **call.stats.as_dict(),
                          "bytes_read": self.reader.bytes_read - start["bytes"], "peak_rss": self.rss.peak,
                          "peak_rss_process": self.rss.process_peak}
        return out

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64, bits: int | None = None,
                     quality: float | None = None, min_bits: int | None = None, max_bits: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     wait: bool | None = None, stop: set[int] = frozenset(),
                     report: dict | None = None) -> Iterator[int]:
        """Yield new token ids one by one (prefill the prompt, then decode), ending at the model's
        end-of-sequence ids or at `stop`. Its stats go to `model.stats` (the last request's) and, when
        given, to `report` (this request's, whatever ran beside it)."""
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        prompt_ids = self._check_ids(prompt_ids)
        check_sampling(temperature, top_p, max_tokens)
        knobs = {"bits": bits, "quality": quality, "min_bits": min_bits, "max_bits": max_bits, "wait": wait}
        with self._call(len(prompt_ids) + max_tokens, knobs) as (call, kv, start):
            pick = partial(sample, temperature=temperature, top_p=top_p, rng=generator(seed))
            req = Request(list(prompt_ids), kv, call.request, pick, int(max_tokens), self.eos_ids | stop,
                          call.stats)
            t0 = t1 = time.perf_counter()
            new = 0
            for token in self.batcher.run(req) if max_tokens else ():
                if new == 0:
                    t1 = time.perf_counter()
                new += 1
                yield token
            stats = self._record(call, start, len(prompt_ids), new, t1 - t0, time.perf_counter() - t1)
            if report is not None:
                report.update(stats)

    def _warn_if_degraded(self, call: Call) -> None:
        """Once per model: a request that waits for its widths (fixed bits, the default) ran some experts
        narrower because the cache had no room for them. (A --quality request computes with what is
        resident when late, by design; its stats say how often.)"""
        what = call.stats.degradation()
        if what and call.request.wait and not self._warned_degraded:
            self._warned_degraded = True
            warnings.warn(f"the memory budget is too small for the widths asked: {what}; raise --memory-budget "
                          "or ask fewer bits (--bits, --quality) to choose the trade yourself",
                          BudgetWarning, stacklevel=3)

    def _record(self, call: Call, start: dict, prompt: int, new: int, prefill_s: float,
                decode_s: float) -> dict:
        self._warn_if_degraded(call)
        read = self.reader.bytes_read - start["bytes"]
        stats = self.stats = {
                      "prompt_tokens": prompt, "new_tokens": new, "prefill_s": prefill_s, "decode_s": decode_s,
                      # the first new token comes from the prefill's logits: n tokens, n - 1 decode steps
                      "decode_tokens_per_s": (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
                      **call.stats.as_dict(),
                      "stall_fraction": call.stats.stall_s / max(prefill_s + decode_s, 1e-9),
                      "bytes_read": read, "bytes_read_per_token": read / max(prompt + new, 1),
                      "read_s": self.reader.read_seconds - start["read_s"],  # the reader thread's time in reads
                      "peak_rss": self.rss.peak, "peak_rss_process": self.rss.process_peak,
                      "memory_budget": self.memory_plan.budget}
        return stats

    def stream(self, prompt: str, max_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield text pieces as tokens are generated (whole UTF-8 characters only)."""
        yield from self.stream_ids(self.encode(prompt), max_tokens, **kwargs)

    def chat_prompt(self, messages: list[dict], template: str | None = None) -> tuple[list[int], set[int]]:
        """(prompt ids, end-of-turn ids) of `messages` ([{"role": "user", "content": "..."}, ...]): the
        file's chat template (or `template`) rendered as transformers renders it; the turn ends at the
        model's end-of-sequence ids or the tokenizer's eos_token."""
        template = template or self.chat_template
        if template is None:
            raise UsageError(f"{self.path} carries no chat template; pass template= or use plain text")
        if self.tokenizer is None:
            raise UsageError(f"{self.path} carries no tokenizer.json; chat needs text")
        text = render(template, messages, add_generation_prompt=True, **self.special_tokens)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids  # the template wrote them
        eos = self.special_tokens.get("eos_token")
        return ids, ({self.tokenizer.token_to_id(eos)} - {None} if eos else set())

    def chat_stream(self, messages: list[dict], max_tokens: int = 256, template: str | None = None,
                    **kwargs) -> Iterator[str]:
        """The assistant's reply to `messages` in text pieces (chat_prompt says how it is prompted)."""
        ids, end_of_turn = self.chat_prompt(messages, template)
        yield from self.stream_ids(ids, max_tokens, stop_ids=end_of_turn, **kwargs)

    def chat(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> str:
        return "".join(self.chat_stream(messages, max_tokens, **kwargs))

    def stream_ids(self, ids: list[int], max_tokens: int = 64, stop: list[str] | tuple = (),
                   stop_ids: set[int] = frozenset(), usage: dict | None = None, **kwargs) -> Iterator[str]:
        """Text pieces of the continuation of token ids (whole UTF-8 characters). It ends at the model's
        end-of-sequence ids, `stop_ids`, or the first of the strings `stop` (not part of the text, and
        never half shown). `usage`, when given, is filled with completion_tokens and finish_reason
        ("stop" or "length"), and at the end with the request's stats."""
        if self.tokenizer is None:
            raise UsageError(f"{self.path} carries no tokenizer.json; pass token ids instead of text")
        usage = {} if usage is None else usage
        usage.update(completion_tokens=0, finish_reason="length")
        out, emitted, ends = [], "", self.eos_ids | set(stop_ids)
        for token in self.generate_ids(ids, max_tokens, stop=ends, report=usage, **kwargs):
            usage["completion_tokens"] += 1
            if token in ends:
                usage["finish_reason"] = "stop"
                break
            out.append(token)
            text = self.tokenizer.decode(out)
            if text.endswith("\ufffd"):
                continue
            cut, shown = _stop_cut(text, len(emitted), stop)
            if cut is not None:
                usage["finish_reason"] = "stop"
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                return
            if shown > len(emitted):
                yield text[len(emitted):shown]
                emitted = text[:shown]
        text = self.tokenizer.decode(out)
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            yield text[len(emitted):]  # the held-back start of a stop string that never completed

    def generate(self, prompt: str, max_tokens: int = 64, **kwargs) -> str:
        return "".join(self.stream(prompt, max_tokens, **kwargs))

    def close(self) -> None:
        self.batcher.close()
        self.reader.close()
        self.rss.stop()
        self.container.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_cut(text: str, start: int, stop) -> tuple[int | None, int]:
    """(where the first stop string that ends past `start` begins, or None; how much of text may be
    shown: all but a tail that could be the start of a stop string)."""
    cuts = [i for s in stop if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    if cuts:
        return min(cuts), min(cuts)
    shown = len(text)
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                shown = min(shown, len(text) - n)
                break
    return None, shown


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
        cfg, layout = read_model(c)
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
