"""Request validation, limits and response shaping of the OpenAI-compatible API (pure logic).

    .venv/bin/python -m pytest -q tests/test_openai_api_unit.py
"""

from __future__ import annotations

import json

import pytest

from sdk import openai_api as api
from sdk.hotswap import _looks_like_path

LIMITS = api.Limits(max_tokens=100, max_batch_size=4)
OK = {"model": "gsm8k", "prompt": "2+3="}


@pytest.mark.parametrize("change, param", [
    ({"prompt": 5}, "prompt"), ({"prompt": None}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [[1], []]}, "prompt"), ({"prompt": [True]}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "abc"}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"max_tokens": 101}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"), ({"n": 5}, "n"), ({"stop": 3}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stream": "yes"}, "stream"), ({"model": ""}, "model"),
    ({"model": None}, "model"), ({"model": ["gsm8k"]}, "model"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": "2"}, "logprobs"), ({"logprobs": 2, "stream": True}, "logprobs"),
    ({"echo": "yes"}, "echo"), ({"echo": True, "stream": True}, "echo"), ({"best_of": 3}, "best_of"), ({"seed": "x"}, "seed"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n"), ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_each_bad_completion_field_is_a_400_naming_the_field(change, param):
    with pytest.raises(api.ApiError) as info:
        api.parse_completion({**OK, **change}, LIMITS)
    err = info.value
    assert err.status == 400 and err.param == param
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert param in body["message"]


def test_over_the_cap_message_names_the_cap():
    with pytest.raises(api.ApiError, match="<= 100 on this server"):
        api.parse_completion({**OK, "max_tokens": 10**9}, LIMITS)


def test_a_good_completion_keeps_its_fields():
    p = api.parse_completion({**OK, "prompt": ["a", "b"], "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                              "stop": "\n", "n": 2, "stream": True, "stream_options": {"include_usage": True},
                              "seed": 3, "user": "ignored", "logprobs": None, "presence_penalty": 0}, LIMITS)
    assert (p.model, p.prompts, p.max_tokens, p.temperature, p.top_p, p.stop, p.n, p.stream, p.include_usage,
            p.seed, p.rows) == ("gsm8k", ["a", "b"], 7, 0.0, 0.5, ("\n",), 2, True, True, 3, 4)
    assert api.parse_completion(OK, LIMITS).max_tokens == LIMITS.default_max_tokens


def test_chat_validation_and_content_parts():
    p = api.parse_chat({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}],
                        "max_completion_tokens": 9}, LIMITS)
    assert p.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert p.max_tokens == 9
    for messages in (None, [], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(api.ApiError) as info:
            api.parse_chat({"model": "m", "messages": messages}, LIMITS)
        assert info.value.status == 400 and info.value.param.startswith("messages")


def test_body_not_an_object_and_legacy_generate():
    for body in (None, [], "x", 5):
        with pytest.raises(api.ApiError) as info:
            api.parse_completion(body, LIMITS)
        assert info.value.status == 400
    assert api.parse_legacy({"prompt": "x", "adapter": "gsm8k"}, LIMITS, None).model == "gsm8k"
    assert api.parse_legacy({"prompt": "x", "adapter": "a"}, LIMITS, "hdr").model == "hdr"
    for body, param in (({"prompt": "x", "adapter": ["a"]}, "adapter"), ({"prompt": 5}, "prompt"),
                        ({"prompt": "x", "max_new_tokens": "abc"}, "max_new_tokens"),
                        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(api.ApiError) as info:
            api.parse_legacy(body, LIMITS, None)
        assert (info.value.status, info.value.param) == (400, param)


def test_prompt_token_cap_and_context():
    api.check_prompt_tokens(10, 5, api.Limits(max_prompt_tokens=10), 15, "prompt")
    with pytest.raises(api.ApiError, match="11 prompt tokens exceed"):
        api.check_prompt_tokens(11, 5, api.Limits(max_prompt_tokens=10), None, "prompt")
    with pytest.raises(api.ApiError, match="context of 15"):
        api.check_prompt_tokens(10, 6, api.Limits(max_prompt_tokens=10), 15, "prompt")
    with pytest.raises(ValueError, match="max_batch_size"):
        api.Limits(max_batch_size=0)


def test_error_statuses_and_sse_format():
    assert api.not_found("x").status == 404 and api.not_found("x").body()["error"]["code"] == "model_not_found"
    assert api.overloaded(3).status == 503 and api.timed_out(2).status == 504
    assert api.sse("[DONE]") == "data: [DONE]\n\n"
    chunk = api.completion_chunk(id="c", model="m", created=1, index=0, text="hi")
    assert json.loads(api.sse(chunk)[len("data: "):]) == chunk
    r = api.completion_response(id="c", model="m", choices=[("a", "stop")], prompt_tokens=3, completion_tokens=1)
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_chat_template_fallback_is_chatml(tiny):
    text = api.render_chat(tiny[1], [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("ref, path", [
    ("gsm8k", False), ("gsm8k-lisa@champion", False), ("gsm8k-lisa/3", False), ("models:/gsm8k-lisa/3", False),
    ("/etc", True), ("./runs/a", True), ("~/x", True), ("../x", True), ("runs/adapter", True), ("a\\b", True),
    ("gsm8k-lisa/3/..", True), ("", True),
])
def test_what_counts_as_a_path(ref, path):
    assert _looks_like_path(ref) == path


def test_api_key_check_and_non_loopback_bind_without_a_key_is_refused():
    from sdk.openai_api import ApiError, check_api_key, check_bind

    check_api_key("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer wrong", "s3cret", "Basic s3cret"):
        with pytest.raises(ApiError) as err:
            check_api_key(header, "s3cret")
        assert err.value.status == 401 and err.value.body()["error"]["code"] == "invalid_api_key"
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(ValueError, match="needs an API key"):
        check_bind("0.0.0.0", None)
