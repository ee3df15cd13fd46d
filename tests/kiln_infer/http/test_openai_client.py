"""The official openai client against the HTTP front over a real kiln-infer (real model, real gRPC)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kiln_infer.conftest import ALICE_KEY
from tests.kiln_infer.http.conftest import Front

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion_answers(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.model == "base"


def test_text_content_parts_read_as_one_message(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    reply = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": parts}], max_tokens=24, temperature=0
    )
    plain = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == plain.choices[0].message.content


def test_stream_with_usage_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="base",
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_n_and_list_prompts_give_every_choice(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="base", prompt=["Once upon a time", "The sky is"], n=2, max_tokens=4, temperature=0.8, seed=3
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert all(c.text for c in reply.choices)
    chat = client.chat.completions.create(model="base", messages=QUESTION, n=3, max_tokens=4, seed=1)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    streamed = client.completions.create(model="base", prompt="Hi", n=2, max_tokens=3, stream=True)
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_logprobs_are_returned(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="base", messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.logprob - 1e-4  # greedy: the chosen token is the best
    legacy = client.completions.create(
        model="base", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 4 and len(lp.token_logprobs or []) == 4
    assert all(len(alts) == 2 for alts in lp.top_logprobs or [])
    assert "".join(lp.tokens or []) == legacy.choices[0].text


def test_stop_cuts_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model="base", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    words = free.choices[0].text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = client.completions.create(
        model="base", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert free.choices[0].text.startswith(cut.choices[0].text)


def test_seed_reproduces_a_sampled_answer(client: openai.OpenAI) -> None:
    def ask() -> str:
        r = client.completions.create(
            model="base", prompt="My favourite", max_tokens=8, temperature=1.0, seed=7
        )
        return r.choices[0].text

    assert ask() == ask()


def test_penalties_are_accepted(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="base",
        prompt="la la la la",
        max_tokens=8,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=1.0,
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=QUESTION, max_tokens=4)
    assert err.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"logit_bias": {"1": 5}}}, "logit_bias"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_bad_parameters_are_named(client: openai.OpenAI, extra: dict, param: str) -> None:
    kwargs = {"model": "base", "messages": QUESTION, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.body["param"] == param  # type: ignore[index]
    assert err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert param in err.value.message


def test_wrong_key_is_an_authentication_error(front: Front) -> None:
    with openai.OpenAI(base_url=front.url + "/v1", api_key="not-a-key-at-all", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model="base", prompt="hi", max_tokens=2)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert models[0].id == "base" and models[0].created > 0
    assert client.models.retrieve("base").created == models[0].created


def _counters(front: Front) -> dict[str, float]:
    text = httpx.get(front.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("adapter") == "base" and s.name.endswith(("_total", "_count")):
                key = s.name + ("/" + s.labels["finished_reason"] if "finished_reason" in s.labels else "")
                out[key] = s.value
    return out


def test_metrics_count_exactly_the_tokens_served(client: openai.OpenAI, front: Front) -> None:
    before = _counters(front)
    replies = [
        client.completions.create(model="base", prompt="Once upon a time", max_tokens=5, temperature=0),
        client.chat.completions.create(model="base", messages=QUESTION, max_tokens=7, temperature=0),
    ]
    after = _counters(front)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved("kiln:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)  # type: ignore[union-attr]
    assert moved("kiln:generation_tokens_total") == sum(r.usage.completion_tokens for r in replies)  # type: ignore[union-attr]
    assert moved("kiln:e2e_request_latency_seconds_count") == 2
    assert sum(moved(k) for k in after if k.startswith("kiln:request_success_total/")) == 2


async def _stream_many(url: str, count: int) -> list[BaseException | str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=300) as c:

        async def one(i: int) -> str:
            stream = await c.completions.create(model="base", prompt=f"Count {i}:", max_tokens=2, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


def test_256_concurrent_streams_have_no_connection_errors(front: Front) -> None:
    results = asyncio.run(_stream_many(front.url, 256))
    connection_errors = [r for r in results if isinstance(r, openai.APIConnectionError)]
    assert connection_errors == []
    # the asyncio server admits them all (64 decode together, the rest queue): every stream completes
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert all(isinstance(r, str) and r for r in results)
