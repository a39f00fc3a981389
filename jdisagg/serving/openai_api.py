"""The OpenAI API as jdisagg requests: request bodies of ``/v1/completions`` and
``/v1/chat/completions`` mapped onto ``serving.intake`` (which checks every value), and
outputs shaped as OpenAI responses and stream chunks. No HTTP here (``serving.http`` serves it).

Fields (both endpoints unless marked): ``model`` (the served model's name; leaving it out
means that one), ``prompt`` (completions: text, token ids, or a list of one of those) /
``messages`` (chat: roles system, developer (as system), user, assistant; content text or
text parts), ``max_tokens`` and ``max_completion_tokens`` (chat; the latter wins; default: up
to the preset's ``max_seq_len``), ``temperature`` (default 1, as OpenAI's), ``top_p``,
``seed`` (default random), ``stop`` (a string or up to 16), ``logprobs`` (completions: top
alternatives 0-20; chat: true/false) and ``top_logprobs`` (chat, 0-20), ``stream``,
``stream_options.include_usage``; and the extras vLLM and SGLang also take: ``top_k``
(0 or -1: off), ``ignore_eos``, ``stop_token_ids``. A field that asks for something jdisagg
does not do (``n`` > 1, ``tools``, penalties, ``logit_bias``, ``echo``, ``suffix``, ...) and
any unknown field is refused with the field's name, never ignored; such a field with its
neutral value (``n: 1``, ``tools: []``, ``null``, ...) is accepted.

Responses carry ``usage``, ``finish_reason`` ("stop" or "length"), and two extras: each
choice's ``token_ids`` (the new tokens) and the request's ``latency`` (jdisagg's breakdown:
queue, prefill, KV transfer time and bytes, decode queue, TTFT, TPOT, E2E, preemptions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from jdisagg.sched.params import Logprob, SamplingParams
from jdisagg.sched.request import Output, Request
from jdisagg.serving.intake import Intake

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system instructions
NO_LOGPROB = -9999.0  # stands for -inf, which JSON cannot carry

# Fields jdisagg does not implement, accepted only with the value that asks for nothing.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v == 1,
    "best_of": lambda v: v == 1,
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "frequency_penalty": lambda v: v == 0,
    "presence_penalty": lambda v: v == 0,
    "repetition_penalty": lambda v: v == 1,
    "min_p": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
    "store": lambda v: v is False,
}
_IGNORED = ("user", "metadata", "service_tier", "parallel_tool_calls")  # no effect on the output
_COMMON = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop")
_EXTRAS = ("top_k", "ignore_eos", "stop_token_ids")
_FIELDS = {
    "completion": {"prompt", "logprobs", *_COMMON, *_EXTRAS},
    "chat": {"messages", "max_completion_tokens", "logprobs", "top_logprobs", *_COMMON, *_EXTRAS},
}


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI error body (``param``: the field)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    kinds |= {413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
    kind = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object; malformed, too deep or not an object: 400."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and over-long integers
        raise bad(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise bad(f"the body must be a JSON object, not {type(value).__name__}")
    return value


# ---- field types (bool is an int in Python, but not in JSON) ---------------------------------


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise bad(f"{name} must be an integer", name)
    return v


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise bad(f"{name} must be a number", name)
    if v is None:
        return None
    try:
        return float(v)
    except OverflowError:  # an integer beyond any float
        return math.inf


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"{name} must be true or false", name)
    return v


def text_field(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise bad(f"{name} must be a string", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a "\\ud800" escape
        raise bad(f"{name} is not valid Unicode (a lone surrogate)", name) from None
    return v


def _token_ids(v: Any, name: str) -> list[int] | None:
    """``v`` as token ids if it is a list of integers (None if it is not a list)."""
    if not isinstance(v, list):
        return None
    if any(isinstance(t, bool) or not isinstance(t, int) for t in v):
        raise bad(f"{name} must be text or a list of integer token ids", name)
    return v


# ---- requests ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """One accepted API call: its request and how to answer it."""

    kind: str  # "completion" or "chat"
    request: Request
    model: str
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # alternatives to report per token; None: no logprobs
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def parse_call(kind: str, raw: bytes, intake: Intake, model_name: str) -> Call:
    """The call in a request body; ApiError for what the API refuses, ValueError (from the
    intake) for values the server cannot serve."""
    body = parse_json(raw)
    _check_fields(kind, body)
    model = body.get("model")
    if model is not None and text_field(model, "model") != model_name:
        message = f"the model {model!r:.100} does not exist; this server serves {model_name!r}"
        raise ApiError(404, message, "model", "model_not_found")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options goes with stream: true", "stream_options")
        if not isinstance(options, dict):
            raise bad("stream_options must be an object", "stream_options")
        unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
        if unknown:
            raise bad(f"unsupported field stream_options.{unknown[0][:80]}", f"stream_options.{unknown[0][:80]}")
    include_usage = bool(_bool(options or {}, "include_usage"))
    if kind == "chat":
        max_tokens = _int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens")
        want_logprobs, top = _bool(body, "logprobs"), _int(body, "top_logprobs")
        if top is not None and not want_logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        top_logprobs = (top or 0) if want_logprobs else None
    else:
        max_tokens, top_logprobs = _int(body, "max_tokens"), _int(body, "logprobs")
    params = _sampling(body, max_tokens, top_logprobs, intake)  # checked before the prompt is tokenized
    if kind == "chat":
        prompt = intake.encode_chat(chat_messages(body.get("messages")))
    else:
        prompt = _prompt(body.get("prompt"), intake)
    return Call(kind, intake.request(prompt, params), model_name, stream, include_usage, top_logprobs)


def _check_fields(kind: str, body: dict) -> None:
    for name, value in body.items():
        if name in _FIELDS[kind] or name in _IGNORED or value is None:
            continue
        if name in _NEUTRAL:
            if not _NEUTRAL[name](value):
                raise bad(f"{name}={json.dumps(value)[:80]} is not supported by jdisagg", name)
            continue
        raise bad(f"unsupported field {name[:80]!r}", name[:80])


def _prompt(v: Any, intake: Intake) -> list[int]:
    if v is None:
        raise bad("prompt is required", "prompt")
    if isinstance(v, list) and v and isinstance(v[0], str | list):  # a batch of prompts
        if len(v) > 1:
            raise bad(f"prompt holds {len(v)} prompts; jdisagg takes one per request", "prompt")
        v = v[0]
    ids = _token_ids(v, "prompt")
    if ids is not None:
        return ids
    text = text_field(v, "prompt")
    return intake.encode_text(text) if text else []


def chat_messages(v: Any) -> list[dict]:
    if not isinstance(v, list):
        raise bad("messages must be a list of messages", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where)
        for key, value in m.items():
            if key not in ("role", "content", "name") and value not in (None, []):
                raise bad(f"unsupported field {where}.{key[:80]}", f"{where}.{key[:80]}")
        role = m.get("role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"{where}.content[{j}] is not a text part; jdisagg serves text only", where)
                parts.append(text_field(part.get("text"), f"{where}.content[{j}].text"))
            content = "".join(parts)
        elif content is None:
            content = ""
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        out.append({"role": role, "content": text_field(content, f"{where}.content")})
    return out


def _sampling(body: dict, max_tokens: int | None, top_logprobs: int | None, intake: Intake) -> SamplingParams:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list):
        raise bad("stop must be a string or a list of strings", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if _token_ids(stop_ids, "stop_token_ids") is None:
        raise bad("stop_token_ids must be a list of integers", "stop_token_ids")
    temperature, top_p = _number(body, "temperature"), _number(body, "top_p")
    top_k, seed = _int(body, "top_k"), _int(body, "seed")
    # The API reports the sampled token's logprob even with 0 alternatives; the device computes
    # it only when asked for at least one.
    logprobs = 0 if top_logprobs is None else top_logprobs or 1
    return SamplingParams(
        max_tokens=intake.limits.max_tokens if max_tokens is None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_k=0 if top_k in (None, -1) else top_k,
        top_p=1.0 if top_p is None else top_p,
        seed=random.getrandbits(32) if seed is None else seed,
        stop=tuple(text_field(s, "stop") for s in stops),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(_bool(body, "ignore_eos")),
        logprobs=logprobs,
    )


# ---- responses --------------------------------------------------------------------------------


class Answer:
    """Turns one call's ``Output``s into OpenAI response bodies and stream chunks."""

    def __init__(self, call: Call, tokenizer):
        self.call, self.tokenizer = call, tokenizer
        self._offset = 0  # completions logprobs: where the next token's text starts
        self._started = False  # chat stream: the first chunk carries the role

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"

    def _logprobs(self, out: Output) -> dict | None:
        n = self.call.top_logprobs
        if n is None or not out.logprobs:
            return None if n is None else self._empty_logprobs()
        pairs = list(zip(out.tokens, out.logprobs, strict=False))
        if self.call.kind == "chat":
            return {"content": [self._chat_logprob(t, lp, n) for t, lp in pairs]}
        pieces = [self._piece(t) for t, _ in pairs]
        offsets = []
        for p in pieces:
            offsets.append(self._offset)
            self._offset += len(p)
        return {
            "tokens": pieces,
            "token_logprobs": [_finite(lp.logprob) for _, lp in pairs],
            "top_logprobs": [{self._piece(i): _finite(v) for i, v in lp.top[:n]} for _, lp in pairs],
            "text_offset": offsets,
        }

    def _empty_logprobs(self) -> dict:
        if self.call.kind == "chat":
            return {"content": []}
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _chat_logprob(self, token: int, lp: Logprob, n: int) -> dict:
        def entry(t: int, v: float) -> dict:
            piece = self._piece(t)
            return {"token": piece, "logprob": _finite(v), "bytes": list(piece.encode("utf-8", "replace"))}

        return {**entry(token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top[:n]]}

    def _choice(self, out: Output, finish_reason: str | None, *, delta: bool) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.call.kind == "chat":
            message = {"role": "assistant", "content": out.text}
            if delta and self._started:
                del message["role"]
            self._started = True
            choice["delta" if delta else "message"] = message
        else:
            choice["text"] = out.text
        choice |= {"logprobs": self._logprobs(out), "finish_reason": finish_reason, "token_ids": out.tokens}
        return choice

    def _envelope(self, chunk: bool) -> dict:
        kind = {"completion": "text_completion", "chat": "chat.completion"}[self.call.kind]
        if chunk and self.call.kind == "chat":
            kind += ".chunk"
        return {"id": self.call.id, "object": kind, "created": self.call.created, "model": self.call.model}

    def usage(self) -> dict:
        r = self.call.request
        return {
            "prompt_tokens": len(r.prompt),
            "completion_tokens": len(r.output),
            "total_tokens": len(r.prompt) + len(r.output),
        }

    def chunks(self, out: Output, latency: dict | None = None) -> list[dict]:
        """The stream chunks for one update; the last (``out.finished``) carries ``latency``."""
        finished = out.finished
        if not (out.tokens or out.text or finished):
            return []
        chunk = self._envelope(True) | {"choices": [self._choice(out, self._finish(out), delta=True)]}
        if finished:
            chunk["latency"] = latency
        if self.call.include_usage:
            chunk["usage"] = None
        chunks = [chunk]
        if finished and self.call.include_usage:
            chunks.append(self._envelope(True) | {"choices": [], "usage": self.usage()})
        return chunks

    def body(self, out: Output, latency: dict) -> dict:
        """The whole response, from all the outputs merged into ``out``."""
        choice = self._choice(out, self._finish(out), delta=False)
        return self._envelope(False) | {"choices": [choice], "usage": self.usage(), "latency": latency}

    def _finish(self, out: Output) -> str | None:
        return self.call.request.finish_reason if out.finished else None


def merge(outputs: list[Output]) -> Output:
    return Output(
        [t for o in outputs for t in o.tokens],
        "".join(o.text for o in outputs),
        [lp for o in outputs for lp in o.logprobs],
        bool(outputs) and outputs[-1].finished,
    )


def _finite(v: float) -> float:
    return v if math.isfinite(v) else NO_LOGPROB


def dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
