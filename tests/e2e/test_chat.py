"""Chat templates: rendered as transformers' apply_chat_template renders them, read from the model file,
and a chat turn on the demo model equal to generating from the rendered prompt."""

import json
import subprocess
import sys

import pytest

import edge_moe
from edge_moe.api import DEMO_MODEL
from edge_moe.convert import convert
from edge_moe.errors import UsageError
from edge_moe.format.container import Container
from edge_moe.model.load import chat_template, special_tokens
from edge_moe.runtime.chat import render
from tests.model.tiny import save_tiny

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{{ eos_token if messages | length > 3 else '' }}{{ {'n': messages | length} | tojson }}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "def fibonacci(n):"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  hi  "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "é <x>"}, {"role": "assistant", "content": "d"}],
]


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import PreTrainedTokenizerFast

    with Container(DEMO_MODEL) as c:
        tok = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
            c.read_file("tokenizer.json").decode()), **special_tokens(c))
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("generation", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_render_matches_transformers(demo_tokenizer, messages, generation):
    want = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    got = render(CHATML, messages, add_generation_prompt=generation, eos_token=demo_tokenizer.eos_token)
    assert got == want


def test_template_errors_are_usage_errors():
    with pytest.raises(UsageError, match="refused these messages: unknown role tool"):
        render(CHATML, [{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="does not parse"):
        render("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(UsageError, match="non-empty list"):
        render(CHATML, [])


def test_a_chat_turn_is_generation_from_the_rendered_prompt():
    messages = CONVERSATIONS[0]
    with edge_moe.load() as m:
        assert "<|im_start|>" in m.chat_template  # the demo model's own (tokenizer_config.json)
        reply = m.chat(messages, max_tokens=12, template=CHATML)
        text = render(CHATML, messages, **m.special_tokens)
        ids = m.tokenizer.encode(text, add_special_tokens=False).ids
        want = []
        for token in m.generate_ids(ids, max_tokens=12):
            if token in m.eos_ids:
                break
            want.append(token)
        assert reply == m.tokenizer.decode(want)
        m.chat_template = None
        with pytest.raises(UsageError, match="carries no chat template"):
            m.chat(messages)


def test_the_template_travels_in_the_model_file(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "chat_template": [{"name": "default", "template": CHATML},
                                                                    {"name": "tool_use", "template": "x"}]}))
    path = convert(tmp_path / "hf", tmp_path / "a.emoe", group=64, progress=False)
    with Container(path) as c:
        assert chat_template(c) == CHATML and special_tokens(c) == {"eos_token": "<|im_end|>"}
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # takes precedence
    path = convert(tmp_path / "hf", tmp_path / "b.emoe", group=64, progress=False)
    with Container(path) as c:
        assert chat_template(c) == "{{ messages[0]['content'] }}"


def test_cli_chat_one_turn_and_a_conversation_from_stdin():
    with edge_moe.load() as m:
        want = m.chat([{"role": "user", "content": "hi"}], max_tokens=8)
    command = [sys.executable, "-m", "edge_moe.cli", "run", "--chat", "--max-tokens", "8"]
    r = subprocess.run([*command, "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr
    r = subprocess.run(command, input="hi\nand then?\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith(want + "\n") and r.stdout.count("\n") == 2, r.stderr
