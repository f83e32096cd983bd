"""`edge-moe serve`: an OpenAI-compatible HTTP server over one Model (Starlette and uvicorn, the `serve`
extra). Requests run through the model's batcher: concurrent requests share each forward step."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_moe.errors import BusyError, EdgeMoeError, UsageError
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.sampling import check_sampling

KNOBS = ("bits", "quality", "min_bits", "max_bits")  # edge-moe's extra request fields
RATE_WINDOW_S = 30.0  # /metrics' tokens/s: over the last this many seconds


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Metrics:
    """What /metrics exports: counters since start, the recent token rate, widths and cache hits."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.failed = self.prompt_tokens = self.completion_tokens = 0
        self.pairs = self.hits = 0
        self.widths: dict[int, int] = {}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of finished pieces

    def tokens(self, n: int) -> None:
        with self.lock:
            self.completion_tokens += n
            now = time.monotonic()
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()

    def finished(self, prompt_tokens: int, stats: dict) -> None:
        with self.lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            hist = stats.get("bits_histogram", {})
            pairs = sum(hist.values())
            self.pairs += pairs
            self.hits += round(stats.get("hit_rate", 0.0) * pairs)
            for bits, n in hist.items():
                self.widths[bits] = self.widths.get(bits, 0) + n

    def rate(self) -> float:
        with self.lock:
            now = time.monotonic()
            return sum(n for t, n in self.recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    def text(self, model) -> str:
        rows = [("edgemoe_requests_total", "counter", "requests completed", self.requests),
                ("edgemoe_requests_failed_total", "counter", "requests refused or failed", self.failed),
                ("edgemoe_prompt_tokens_total", "counter", "prompt tokens processed", self.prompt_tokens),
                ("edgemoe_completion_tokens_total", "counter", "tokens generated", self.completion_tokens),
                ("edgemoe_tokens_per_second", "gauge", f"tokens generated per second over the last "
                 f"{RATE_WINDOW_S:.0f} s", self.rate()),
                ("edgemoe_bytes_read_total", "counter", "expert bytes read from the model file",
                 model.reader.bytes_read),
                ("edgemoe_cache_hit_rate", "gauge", "share of (token, expert) computations whose levels were "
                 "resident", self.hits / self.pairs if self.pairs else 0.0),
                ("edgemoe_peak_rss_bytes", "gauge", "peak resident memory of the process",
                 model.rss.process_peak),
                ("edgemoe_memory_budget_bytes", "gauge", "--memory-budget (0: none)",
                 model.memory_plan.budget or 0),
                ("edgemoe_active_requests", "gauge", "requests in the batch", len(model.batcher.active)),
                ("edgemoe_queue_depth", "gauge", "requests waiting for a batch slot", model.batcher.depth)]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP edgemoe_expert_width_total (token, expert) computations by expert width in bits",
                  "# TYPE edgemoe_expert_width_total counter"]
        lines += [f'edgemoe_expert_width_total{{bits="{b}"}} {n}' for b, n in sorted(self.widths.items())]
        return "\n".join(lines) + "\n"


def _field(body: dict, name: str, kind, default=None, check=None):
    """body[name] of type `kind` (None: default), or a 400 naming the field."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or (check is not None and not check(value)):
        raise ApiError(400, f"'{name}' has an invalid value: {str(value)[:80]!r}", name)
    return value


def _options(body: dict, model_id: str, default_knobs: dict) -> dict:
    """The generation options of a request body, checked: OpenAI's fields and edge-moe's knobs."""
    if body.get("model") not in (None, model_id):
        raise ApiError(404, f"The model '{body['model']}' does not exist; this server serves '{model_id}'",
                       "model", code="model_not_found")
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' must be 1: one choice per request", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             any(not isinstance(s, str) or not s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    max_tokens = _field(body, "max_completion_tokens", int, None) or _field(body, "max_tokens", int, 256)
    options = {"max_tokens": max_tokens, "temperature": _field(body, "temperature", float, 1.0),
               "top_p": _field(body, "top_p", float, 1.0), "seed": _field(body, "seed", int),
               "stop": stop or ()}
    knobs = {k: _field(body, k, float if k == "quality" else int) for k in KNOBS}
    if all(v is None for v in knobs.values()):  # the server's defaults (--profile) for a request with none
        knobs.update(default_knobs)
    try:
        check_sampling(options["temperature"], options["top_p"], max_tokens)
        BitRequest.make(**knobs)
    except UsageError as e:
        raise ApiError(400, str(e).replace("--", "")) from None
    return {**options, **{k: v for k, v in knobs.items() if v is not None}}


def _prompt_ids(model, body: dict, chat: bool) -> tuple[list[int], set[int]]:
    """(prompt token ids, end-of-turn ids) of a chat or completion request."""
    try:
        if chat:
            return model.chat_prompt(body.get("messages"))
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        return model.encode(prompt), set()
    except UsageError as e:
        raise ApiError(400, str(e), "messages" if chat else "prompt") from None


class Generation:
    """One request's text pieces, produced in worker threads (the model's batcher steps there)."""

    def __init__(self, model, ids: list[int], end_of_turn: set[int], options: dict, metrics: Metrics):
        self.model, self.metrics, self.prompt_tokens = model, metrics, len(ids)
        if len(ids) + options["max_tokens"] > model.max_context:
            raise ApiError(400, f"{len(ids)} prompt tokens + max_tokens {options['max_tokens']} exceed the "
                           f"context of {model.max_context} tokens", "max_tokens")
        self.usage: dict = {}
        self.pieces = model.stream_ids(ids, stop_ids=end_of_turn, usage=self.usage, **options)
        self.counted = 0

    async def next(self) -> str | None:
        """The next piece, or None at the end; refusals as ApiError."""
        try:
            piece = await anyio.to_thread.run_sync(next, self.pieces, None)
        except BusyError as e:
            raise ApiError(429, str(e), kind="server_busy") from None
        except UsageError as e:
            raise ApiError(400, str(e)) from None
        self.metrics.tokens(self.usage["completion_tokens"] - self.counted)
        self.counted = self.usage["completion_tokens"]
        if piece is None:
            self.metrics.finished(self.prompt_tokens, self.usage)
        return piece

    async def close(self) -> None:
        """Leave the batch now (a client that went away frees its slot)."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.pieces.close)

    def usage_fields(self) -> dict:
        done = self.usage.get("completion_tokens", 0)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}


def build_app(model, model_id: str, api_key: str | None = None, default_knobs: dict | None = None) -> Starlette:
    """The ASGI app serving `model` as `model_id`; default_knobs: for requests that give none."""
    metrics = Metrics()
    created = int(time.time())

    def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           kind="authentication_error", code="invalid_api_key")

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        return body

    async def completions(request: Request, chat: bool) -> Response:
        try:
            authorized(request)
            body = await body_of(request)
            options = _options(body, model_id, default_knobs or {})
            ids, end_of_turn = _prompt_ids(model, body, chat)
            gen = Generation(model, ids, end_of_turn, options, metrics)
            first = await gen.next()  # refusals (a full queue) still get their status code
        except ApiError as e:
            metrics.failed += 1
            return e.response()
        rid, kind = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", chat
        if body.get("stream"):
            return StreamingResponse(_events(gen, first, rid, kind), media_type="text/event-stream")
        try:
            text = first or ""
            while (piece := await gen.next()) is not None:
                text += piece
        except ApiError as e:
            metrics.failed += 1
            return e.response()
        finally:
            await gen.close()
        return JSONResponse(_whole(rid, kind, text, gen))

    def _choice(kind: bool, text: str, finish, delta: bool) -> dict:
        if not kind:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text}
        return {"index": 0, ("delta" if delta else "message"): message, "logprobs": None,
                "finish_reason": finish}

    def _envelope(rid: str, kind: bool, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if kind else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}

    def _whole(rid: str, kind: bool, text: str, gen: Generation) -> dict:
        choice = _choice(kind, text, gen.usage["finish_reason"], False)
        return {**_envelope(rid, kind, False), "choices": [choice], "usage": gen.usage_fields()}

    async def _events(gen: Generation, piece, rid: str, kind: bool):
        try:
            while piece is not None:
                chunk = {**_envelope(rid, kind, True), "choices": [_choice(kind, piece, None, True)]}
                yield f"data: {json.dumps(chunk)}\n\n"
                piece = await gen.next()
            choice = _choice(kind, "", gen.usage["finish_reason"], True)
            last = {**_envelope(rid, kind, True), "choices": [choice], "usage": gen.usage_fields()}
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        except (ApiError, EdgeMoeError) as e:
            error = e if isinstance(e, ApiError) else ApiError(500, str(e), kind="server_error")
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
        finally:
            await gen.close()

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        try:
            authorized(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                         "owned_by": "edge-moe"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.text(model), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc) -> Response:
        return ApiError(404, f"No route {request.method} {request.url.path}", code="not_found").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        metrics.failed += 1
        return ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error").response()

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_text, methods=["GET"])]
    handlers = {404: not_found, 405: not_found, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.metrics = metrics
    return app


def serve(model, model_id: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          default_knobs: dict | None = None) -> None:
    """Serve until interrupted (uvicorn, one process; the model's batcher runs the requests)."""
    import uvicorn

    uvicorn.run(build_app(model, model_id, api_key, default_knobs), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)
