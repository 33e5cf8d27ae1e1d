"""The OpenAI-compatible surface of the Serve app, as pure functions: limits, request
validation, error bodies, response and stream-chunk shaping (no Ray, no torch).

    .venv/bin/python -m pytest -q tests/test_openai_api_unit.py

Every invalid request becomes an `ApiError` carrying its HTTP status and the body OpenAI
clients expect: {"error": {"message", "type", "param", "code"}}. Limits are checked here,
before any tokenizing or generation work, except the prompt-token cap, which needs the
tokenizer (`check_prompt_tokens`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# A plain template for tokenizers that ship none (the tiny test tokenizer): ChatML, which
# SmolLM2's own template also is.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    """Server-side caps, enforced before any work (all configurable at start).

    >>> Limits(max_tokens=256, max_batch_size=8).max_queue
    64
    """

    max_tokens: int = 512            # largest max_tokens a request may ask for
    default_max_tokens: int = 64     # when the request gives none
    max_prompt_tokens: int = 2048    # per prompt, after the chat template
    max_batch_size: int = 16         # rows in one decode batch; a request's prompts x n may not exceed it
    max_queue: int = 64              # requests waiting for a batch; beyond: 503
    timeout_s: float = 60.0          # per request, queueing included; its generation stops at the deadline
    batch_wait_s: float = 0.01       # an idle replica waits this long after a request, so that requests
                                     # sent together are prefilled together (a busy one admits between steps)

    def __post_init__(self):
        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_batch_size", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens: {self.default_max_tokens} exceeds max_tokens {self.max_tokens}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s!r}")


class ApiError(Exception):
    """An error answered to the client: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_api_key(authorization: str | None, api_key: str) -> None:
    """401 unless the Authorization header is `Bearer <api_key>` (compared in constant time)."""
    import hmac

    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` (the openai "
                       "client's api_key).", code="invalid_api_key")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, api_key: str | None) -> None:
    """Serving beyond this machine needs an API key: refuse a non-loopback host without one."""
    if api_key is None and not (host in LOOPBACK or host.startswith("127.")):
        raise ValueError(f"host: serving on {host} (reachable from other machines) needs an API key; give "
                         "--api-key KEY or set LISA_HUB_API_KEY")


def not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist or is not served here; GET /v1/models lists them.",
                    param="model", code="model_not_found")


def overloaded(waiting: int) -> ApiError:
    return ApiError(503, f"Server overloaded: {waiting} requests are already waiting; retry later.",
                    type="server_error", code="overloaded")


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"Request timed out after {seconds:g} s; its generation was stopped.",
                    type="timeout_error", code="timeout")


MAX_LOGPROBS = 20  # top-k per token a completions request may ask for (vLLM's default cap)


@dataclass
class GenParams:
    """A validated generation request (completion or chat)."""

    model: str
    prompts: list[str] = field(default_factory=list)           # completions: one or more prompts
    messages: list[dict[str, str]] | None = None               # chat: normalised messages
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    ignore_eos: bool = False     # vLLM's extension (extra_body={"ignore_eos": true}): exactly max_tokens
    logprobs: int | None = None  # completions: log-probabilities of each token and the top-k (0..MAX_LOGPROBS)
    echo: bool = False           # completions: the prompt (text and log-probabilities) comes back first
    prompt_ids: list[list[int]] | None = None  # completions: prompts given as token ids

    @property
    def rows(self) -> int:
        return max(1, len(self.prompts), len(self.prompt_ids or ())) * self.n


# ----------------------------------------------------------------------------- validation

def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int | None, hint: str = "") -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"must be an integer, got {json.dumps(value)[:40]}", "invalid_type")
    if value < lo:
        raise _bad(key, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise _bad(key, f"must be <= {hi} on this server{hint}, got {value}")
    return value


def _float(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(key, f"must be a number, got {json.dumps(value)[:40]}", "invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        raise _bad(key, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value:g}")
    return float(value)


def _common(body: Any, limits: Limits, *, chat: bool) -> GenParams:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model", "required, a non-empty string naming an adapter or the base model (GET /v1/models)",
                   "invalid_type" if model is not None else "missing")
    unsupported = (("logprobs", lambda v: v in (None, False)), ("top_logprobs", lambda v: v in (None, 0)),
                   ("echo", lambda v: v in (None, False))) if chat else ()
    for key, ok in (*unsupported, ("best_of", lambda v: v in (None, 1)),
                    ("suffix", lambda v: v is None), ("logit_bias", lambda v: not v),
                    ("presence_penalty", lambda v: v in (None, 0)), ("frequency_penalty", lambda v: v in (None, 0)),
                    ("tools", lambda v: not v), ("functions", lambda v: not v)):
        if not ok(body.get(key)):
            raise _bad(key, "not supported by this server", "unsupported_parameter")
    hint = " (server cap)"
    echo = False if chat else body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise _bad("echo", "must be true or false", "invalid_type")
    logprobs = None if chat else _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, limits.default_max_tokens, 0 if echo else 1, limits.max_tokens, hint)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stop = tuple(stop)
    else:
        raise _bad("stop", "must be a string or a list of at most 4 strings", "invalid_type")
    if any(not s for s in stop):
        raise _bad("stop", "stop strings must not be empty")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false", "invalid_type")
    if stream and (echo or logprobs is not None):
        raise _bad("logprobs" if logprobs is not None else "echo", "not supported with stream", "unsupported_parameter")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object", "invalid_type")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "must be true or false", "invalid_type")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", "must be an integer", "invalid_type")
    return GenParams(model=model.strip(), max_tokens=max_tokens,
                     temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                     top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), stop=stop,
                     n=_int(body, "n", 1, 1, limits.max_batch_size), stream=stream,
                     include_usage=bool(options.get("include_usage", False)), seed=seed, ignore_eos=ignore_eos,
                     logprobs=logprobs, echo=echo)


def parse_completion(body: Any, limits: Limits) -> GenParams:
    """Validate a POST /v1/completions body.

    >>> parse_completion({"model": "gsm8k", "prompt": "2+3=", "max_tokens": 8}, Limits()).max_tokens
    8
    """
    params = _common(body, limits, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in (prompt if isinstance(prompt[0], list)
                                                                         else [prompt])):
        params.prompt_ids = [list(p) for p in (prompt if isinstance(prompt[0], list) else [prompt])]
        prompts = []
    else:
        raise _bad("prompt", "required: a non-empty string, a list of strings, a list of token ids or a list of "
                   "lists of token ids", "missing" if prompt is None else "invalid_type")
    if any(not p for p in prompts) or any(not p for p in params.prompt_ids or ()):
        raise _bad("prompt", "must not be empty")
    params.prompts = prompts
    if params.rows > limits.max_batch_size:
        raise _bad("n", f"prompts x n = {params.rows} exceeds this server's batch size {limits.max_batch_size}")
    return params


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_chat(body: Any, limits: Limits) -> GenParams:
    """Validate a POST /v1/chat/completions body; message content parts are joined to text.

    >>> parse_chat({"model": "gsm8k", "messages": [{"role": "user", "content": "hi"}]}, Limits()).messages
    [{'role': 'user', 'content': 'hi'}]
    """
    params = _common(body, limits, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "required, a non-empty list of {role, content} objects",
                   "missing" if messages is None else "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(where, f"must be an object with role one of {', '.join(ROLES)}", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(where, "content parts must be text parts ({type: text, text})", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(where, "content must be a string", "invalid_type")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    params.messages = out
    if params.rows > limits.max_batch_size:
        raise _bad("n", f"n = {params.n} exceeds this server's batch size {limits.max_batch_size}")
    return params


def parse_legacy(body: Any, limits: Limits, header_model: str | None) -> GenParams:
    """Validate a POST /generate body {"prompt", "adapter", "max_new_tokens"} (greedy)."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    adapter = header_model or body.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter.strip()):
        raise _bad("adapter", "must be a string (a registry reference) or null", "invalid_type")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "required, a non-empty string", "missing" if prompt is None else "invalid_type")
    max_new = _int(body, "max_new_tokens", limits.default_max_tokens, 1, limits.max_tokens, " (server cap)")
    return GenParams(model=(adapter or "").strip(), prompts=[prompt], max_tokens=max_new, temperature=0.0)


def check_prompt_tokens(n_tokens: int, max_tokens: int, limits: Limits, context: int | None, param: str) -> None:
    """Prompt-token cap and model context, before the request is queued."""
    if n_tokens > limits.max_prompt_tokens:
        raise ApiError(400, f"{param}: {n_tokens} prompt tokens exceed this server's limit of "
                       f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
    if context is not None and n_tokens + max_tokens > context:
        raise ApiError(400, f"{param}: {n_tokens} prompt tokens + max_tokens {max_tokens} exceed the model's "
                       f"context of {context} tokens", param=param, code="context_length_exceeded")


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt of a chat: the base tokenizer's chat template (ChatML when it has none)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template)


# ----------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(*, id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int, created: int | None = None,
                        logprobs: list[dict | None] | None = None) -> dict[str, Any]:
    """choices: (text, finish_reason) in choice order; logprobs: each choice's block or None."""
    blocks = logprobs or [None] * len(choices)
    return {"id": id, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": block, "finish_reason": reason}
                        for i, ((text, reason), block) in enumerate(zip(choices, blocks))],
            "usage": usage(prompt_tokens, completion_tokens)}


def logprobs_block(tokenizer, *, ids: list[int], logprobs: list[float | None],
                   top: list[dict[int, float] | None]) -> dict[str, Any]:
    """The legacy completions `logprobs` object (what vLLM and OpenAI return): each token's
    text, its log-probability, the top-k as {token text: log p}, and its character offset in
    the choice's text."""
    tokens = [tokenizer.decode([i]) for i in ids]
    offsets, at = [], 0
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [None if t is None else {tokenizer.decode([i]): lp for i, lp in t.items()} for t in top],
            "text_offset": offsets}


def chat_response(*, id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                  completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(*, id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(*, id: str, model: str, created: int, index: int, delta: dict[str, str],
               finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(*, id: str, model: str, created: int, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def models_response(entries: list[tuple[str, str, int]]) -> dict[str, Any]:
    """entries: (id, owned_by, created unix time)."""
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": c, "owned_by": o} for i, o, c in entries]}


FINISH_REASONS = {"stop": "stop", "length": "length"}
