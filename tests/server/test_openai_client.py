"""The server through the `openai` client: chat and completions, streamed and whole, edge-moe's knobs,
usage, and the tokens equal to the Python API's."""

import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_completion_whole_equals_the_python_api(client, server):
    prompt = "def main():\n    "
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"bits": 4})
    assert r.choices[0].text == server.model.generate(prompt, max_tokens=16, bits=4)
    assert r.usage.prompt_tokens == len(server.model.encode(prompt)) and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_completion_streamed_equals_whole(client):
    kwargs = {"model": "demo", "prompt": "import os\n", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


def test_chat_whole_and_streamed_equal_model_chat(client, server):
    messages = [{"role": "user", "content": "Write a loop"}]
    want = server.model.chat(messages, max_tokens=10, quality=0.5, min_bits=3, max_bits=6)
    knobs = {"quality": 0.5, "min_bits": 3, "max_bits": 6}
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0,
                                       extra_body=knobs)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body=knobs)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_stop_strings_end_the_text_before_them(client):
    kwargs = {"model": "demo", "prompt": "def main():\n    ", "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    stop = whole[5:8]
    r = client.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].text == whole[:whole.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kwargs))
    assert streamed == r.choices[0].text


def test_seeded_sampling_repeats(client):
    kwargs = {"model": "demo", "prompt": "x = ", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second
