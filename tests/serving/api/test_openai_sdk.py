"""The official `openai` SDK (sync and async) against a live server with the tiny model."""

from __future__ import annotations

import time

import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(live_server):
    with openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0,
                       timeout=60) as sdk:  # closed, not left to the garbage collector
        yield sdk


@pytest.fixture
async def aclient(live_server):
    async with openai.AsyncOpenAI(base_url=live_server.base_url, api_key="unused",
                                  max_retries=0, timeout=60) as sdk:
        yield sdk


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_models_lists_the_served_model(client, live_server):
    models = client.models.list().data
    assert [m.id for m in models] == [live_server.model]
    assert models[0].object == "model" and models[0].owned_by == "quiver"


def test_chat_completion_fields_and_usage(client, live_server):
    raw = client.chat.completions.with_raw_response.create(
        model=live_server.model, messages=HELLO, **GREEDY, extra_body={"ignore_eos": True})
    response = raw.parse()
    assert raw.headers["x-request-id"]
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert abs(response.created - time.time()) < 60
    assert response.model == live_server.model
    assert response.system_fingerprint is None
    [choice] = response.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.logprobs is None
    num_prompt = len(chat_prompt_ids(live_server.tokenizer, HELLO))
    assert response.usage.prompt_tokens == num_prompt
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == num_prompt + 12
    assert response.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_equals_completion_over_the_templated_prompt(client, live_server):
    chat = client.chat.completions.create(model=live_server.model, messages=HELLO, **GREEDY)
    completion = client.completions.create(
        model=live_server.model, prompt=chat_prompt_ids(live_server.tokenizer, HELLO), **GREEDY)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.completion_tokens == completion.usage.completion_tokens


def test_roles_and_content_parts(client, live_server):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]
    as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    plain = client.chat.completions.create(model=live_server.model, messages=messages, **GREEDY)
    parts = client.chat.completions.create(model=live_server.model, messages=as_parts, **GREEDY)
    assert plain.choices[0].message.content == parts.choices[0].message.content
    assert plain.usage.prompt_tokens == len(chat_prompt_ids(live_server.tokenizer, messages))


def test_max_completion_tokens_wins(client, live_server):
    response = client.chat.completions.create(
        model=live_server.model, messages=HELLO, temperature=0, max_tokens=20,
        max_completion_tokens=3, extra_body={"ignore_eos": True}, user="alice")
    assert response.usage.completion_tokens == 3
    assert response.choices[0].finish_reason == "length"


def test_n3_seeded_choices_are_reproducible(client, live_server):
    kwargs = dict(model=live_server.model, messages=HELLO, n=3, temperature=1.0, seed=1234,
                  max_tokens=8, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == \
           [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    assert first.usage.completion_tokens == 24


def test_sampling_extras_are_honoured(client, live_server):
    greedy = client.chat.completions.create(model=live_server.model, messages=HELLO, **GREEDY)
    top1 = client.chat.completions.create(
        model=live_server.model, messages=HELLO, temperature=1.0, max_tokens=12,
        presence_penalty=0.0, frequency_penalty=0.0,
        extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    penalised = client.chat.completions.create(
        model=live_server.model, messages=HELLO, **GREEDY,
        extra_body={"repetition_penalty": 5.0, "ignore_eos": True})
    assert penalised.usage.completion_tokens == 12


def test_chat_logprobs_shape(client, live_server):
    response = client.chat.completions.create(
        model=live_server.model, messages=HELLO, **GREEDY, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 12
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # bytes are the token's own, even where it holds only part of a character
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or \
            "\ufffd" in entry.token
        if "\ufffd" not in entry.token:
            assert entry.bytes == list(entry.token.encode())
        # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    raw = b"".join(bytes(entry.bytes) for entry in content)
    assert raw.decode("utf-8", "replace") == response.choices[0].message.content


def test_completion_prompt_forms(client, live_server):
    text_prompt = "The quick brown fox"
    ids = live_server.tokenizer.encode(text_prompt)
    single = client.completions.create(model=live_server.model, prompt=text_prompt, **GREEDY)
    assert single.id.startswith("cmpl-") and single.object == "text_completion"
    by_ids = client.completions.create(model=live_server.model, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == single.choices[0].text
    batch = client.completions.create(model=live_server.model, prompt=[text_prompt, "Hello"],
                                      n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == single.choices[0].text
    batch_ids = client.completions.create(model=live_server.model, prompt=[ids, ids[:2]],
                                          **GREEDY)
    assert batch_ids.choices[0].text == single.choices[0].text
    assert batch_ids.usage.prompt_tokens == len(ids) + 2
    # prompt tokens count once per prompt, whatever n is (as OpenAI counts them)
    assert batch.usage.prompt_tokens == len(ids) + len(live_server.tokenizer.encode("Hello"))


def test_completion_echo_and_logprobs(client, live_server):
    prompt = "Once upon a time"
    plain = client.completions.create(model=live_server.model, prompt=prompt, **GREEDY)
    echoed = client.completions.create(model=live_server.model, prompt=prompt, echo=True,
                                       **GREEDY)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    with_lp = client.completions.create(model=live_server.model, prompt=prompt, logprobs=2,
                                        **GREEDY, extra_body={"ignore_eos": True})
    logprobs = with_lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 12
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 12
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in logprobs.top_logprobs)


def test_cached_tokens_from_the_prefix_cache(client, live_server):
    prompt = " ".join(f"word{i}" for i in range(60))  # several full KV blocks
    client.completions.create(model=live_server.model, prompt=prompt, max_tokens=1)
    again = client.completions.create(model=live_server.model, prompt=prompt, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < again.usage.prompt_tokens


def _boundary_stop(tokens: list[str], text: str) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next, whose first
    occurrence in `text` is exactly at that token boundary."""
    offset = 0
    for i, (left, right) in enumerate(zip(tokens, tokens[1:], strict=False)):
        offset += len(left)
        if i < 2 or len(left) < 2 or len(right) < 2 or "\ufffd" in left + right:
            continue
        stop = left[-2:] + right[:2]
        if text.find(stop) == offset - 2:
            return stop, offset - 2
    raise AssertionError(f"no usable token boundary in {tokens!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_split_across_tokens(client, live_server, stream):
    prompt = "The history of the city"
    base = client.completions.create(model=live_server.model, prompt=prompt, temperature=0,
                                     max_tokens=40, logprobs=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop, cut = _boundary_stop(base.choices[0].logprobs.tokens, text)
    kwargs = dict(model=live_server.model, prompt=prompt, temperature=0, max_tokens=40,
                  stop=[stop, "never-generated-xyz"], extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "stop" and all(f is None for f in finish[:-1])
    else:
        response = client.completions.create(**kwargs)
        got, finish_reason = response.choices[0].text, response.choices[0].finish_reason
        assert finish_reason == "stop"
        assert response.usage.completion_tokens < 40
    assert got == text[:cut]


async def test_async_client_chat_and_stream(aclient, live_server):
    response = await aclient.chat.completions.create(model=live_server.model, messages=HELLO,
                                                     **GREEDY)
    stream = await aclient.chat.completions.create(model=live_server.model, messages=HELLO,
                                                   stream=True, **GREEDY)
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "".join(pieces) == response.choices[0].message.content
    completion = await aclient.completions.create(model=live_server.model, prompt="Hi",
                                                  **GREEDY)
    assert completion.object == "text_completion" and completion.choices[0].text
    await aclient.close()
