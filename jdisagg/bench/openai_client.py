"""The benchmark's client for any OpenAI-compatible server (``bench run --target http://HOST:PORT``):
jdisagg's own HTTP API, vLLM, SGLang, ...

It sends each request to ``POST /v1/completions`` as the gRPC path sends it to ``Generate``:
the same token-id prompt (text for a trace's text prompts), ``max_tokens`` = the output
length, ``ignore_eos: true`` (vLLM and SGLang take it too), greedy, streamed with
``stream_options.include_usage``. A token's time is the arrival of the stream chunk that
carries it. A chunk's tokens are counted from its ``token_ids`` when the server sends them
(jdisagg does); otherwise a chunk with text counts as one token, and when the final usage
reports more completion tokens than were counted, the rest are given the last chunk's time
(so TTFT, E2E, TPOT and the token count are exact, and only ITL is coarser). jdisagg's
``latency`` breakdown fills ``RequestResult.server`` when present. Errors are recorded under
the gRPC code name of their HTTP status (429 -> RESOURCE_EXHAUSTED, ...), so results from both
paths read alike.

Before the sweep it waits for ``GET /health`` (or, for a server without one, ``GET /v1/models``)
and reads ``/v1/models``: the model's name (``model`` picks one of several), ``max_model_len``,
and jdisagg's ``vocab_size``, ``mesh_preset`` and ``devices`` (another server needs
``--vocab_size``). A trace's text prompts are counted by ``POST /tokenize`` (vLLM's API;
jdisagg serves it too).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from jdisagg.bench.loadgen import ServerInfo
from jdisagg.bench.stats import SERVER_FIELDS, RequestResult, Slo
from jdisagg.bench.workloads import BenchRequest

CODE_NAMES = {  # HTTP status -> the gRPC status code name the gRPC path records
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def code_name(status: int) -> str:
    return CODE_NAMES.get(status, f"HTTP_{status}")


class OpenAITarget:
    """One OpenAI-compatible server at ``url`` (``http://HOST:PORT``, with or without ``/v1``)."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None):
        self.target = url
        self.base = url.rstrip("/").removesuffix("/v1")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No cap on open connections (aiohttp's default is 100) and no overall timeout: a
        # benchmark holds many long streams, and the client must not queue them itself.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )

    async def close(self) -> None:
        await self._session.close()

    async def _get(self, path: str) -> tuple[int, dict | str]:
        async with self._session.get(self.base + path, headers=self._headers) as r:
            return r.status, await _body(r)

    async def wait_until_serving(self, wait_s: float) -> ServerInfo:
        """The server's ``ServerInfo`` once it is serving."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                status, body = await self._get("/health")
                if status == 404:  # no health route: the models list answering will do
                    status, body = await self._get("/v1/models")
                if status == 200:
                    break
                last = f"HTTP {status}: {_message(body)}"
                if status in (401, 403):
                    raise RuntimeError(f"the server at {self.target} refused the API key: {last}")
            except aiohttp.ClientError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.target} is not serving after {wait_s:g}s: {last}")
            await asyncio.sleep(0.5)
        status, body = await self._get("/v1/models")
        if status != 200 or not isinstance(body, dict) or not body.get("data"):
            raise RuntimeError(f"GET {self.base}/v1/models answered HTTP {status}: {_message(body)}")
        models = {m.get("id"): m for m in body["data"]}
        if self.model is None and len(models) > 1:
            raise ValueError(f"the server serves {len(models)} models ({', '.join(map(str, models))}): pick one")
        if self.model is not None and self.model not in models:
            raise ValueError(f"the server does not serve {self.model!r}; it serves {', '.join(map(str, models))}")
        card = models[self.model] if self.model is not None else next(iter(models.values()))
        self.model = card["id"]
        return ServerInfo(
            model=self.model,
            mesh_preset=card.get("mesh_preset", ""),
            vocab_size=int(card.get("vocab_size", 0)),
            max_seq_len=int(card.get("max_model_len", 0) or 0),
            gpus=int(card.get("devices", 0)),
        )

    async def tokenize(self, text: str) -> list[int]:
        async with self._session.post(
            self.base + "/tokenize", json={"model": self.model, "prompt": text}, headers=self._headers
        ) as r:
            body = await _body(r)
        if r.status != 200 or not isinstance(body, dict) or "tokens" not in body:
            raise ValueError(
                f"cannot tokenize the trace's text prompts: POST /tokenize answered HTTP {r.status}: {_message(body)}"
            )
        return list(body["tokens"])

    async def send(self, request: BenchRequest, t0: float, slo: Slo) -> RequestResult:
        """Sends one request and records every token's arrival (seconds since ``t0``, perf_counter)."""
        result = RequestResult(request.input_len, request.output_len, clipped=request.clipped)
        body = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        result.sent = time.perf_counter() - t0
        try:
            async with self._session.post(self.base + "/v1/completions", json=body, headers=self._headers) as r:
                if r.status != 200:
                    result.error, result.error_details = code_name(r.status), _message(await _body(r))
                else:
                    await _read_stream(r, result, t0)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            result.error, result.error_details = "UNAVAILABLE", f"{type(e).__name__}: {e}"
        result.end = time.perf_counter() - t0
        return result


async def _read_stream(response: aiohttp.ClientResponse, result: RequestResult, t0: float) -> None:
    """Reads an SSE stream of completion chunks into ``result``."""
    completion_tokens, buffer = None, b""
    async for data in response.content.iter_any():
        now = time.perf_counter() - t0
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                result.error, result.error_details = "BAD_CHUNK", f"not a JSON chunk: {payload[:200]!r}"
                continue
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                error = chunk["error"]
                result.error, result.error_details = "INTERNAL", _message({"error": error})
                continue
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids")
                n = len(ids) if isinstance(ids, list) else int(bool(choice.get("text")))
                result.token_times += [now] * n
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                completion_tokens = chunk["usage"].get("completion_tokens")
            if isinstance(chunk.get("latency"), dict):
                result.server = {k: float(chunk["latency"][k]) for k in SERVER_FIELDS if k in chunk["latency"]}
    if completion_tokens and result.token_times and completion_tokens > len(result.token_times):
        result.token_times += [result.token_times[-1]] * (completion_tokens - len(result.token_times))
    if not result.finish_reason and not result.error:
        result.error, result.error_details = "NO_FINAL", "the stream ended without a finish_reason"


async def _body(response: aiohttp.ClientResponse) -> dict | str:
    text = await response.text(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _message(body: dict | str) -> str:
    """An error body's message (OpenAI shape ``{"error": {"message": ...}}``, or as it came)."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))[:500]
        return str(error)[:500]
    return body[:500]
