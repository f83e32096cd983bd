"""Chat templates: a checkpoint's jinja2 template rendered as transformers' apply_chat_template does
(sandboxed, trim_blocks and lstrip_blocks, its tojson, raise_exception and strftime_now)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_moe.errors import UsageError


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """As transformers' filter: plain JSON, without jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"the chat template does not parse: {e}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, **special_tokens) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]), ending in the assistant's turn."""
    if not isinstance(messages, list) or not messages or \
            any(not isinstance(m, dict) or not isinstance(m.get("role"), str) for m in messages):
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **special_tokens)
    except jinja2.TemplateError as e:
        raise UsageError(f"the chat template refused these messages: {e}") from None
