"""The OpenAI-compatible HTTP API (aiohttp), served by ``serving.server.Server`` on its own
event loop next to the gRPC service, over the same ``admit`` / ``run`` (one intake, one
queue, one set of limits for both protocols).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``stream: true``), ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /tokenize``
(vLLM's shape: ``{"prompt": text}`` or ``{"messages": [...]}`` -> ``{"tokens", "count",
"max_model_len"}``) and ``GET /health`` (200 when serving, else 503; never needs the key).
Request bodies are parsed and checked in the server's intake pool, off the event loop, and
may be at most ``MAX_MESSAGE_BYTES`` (413 past it).

Status codes: 400 bad input (the error body names the field), 401 missing or wrong API key,
404 unknown model or route, 405 wrong method, 413 body too large, 429 queue full, 503 warming
up, draining or failed, 500 a worker failed mid-request (in a stream: an ``error`` event).
A client that disconnects cancels its request (aiohttp cancels the handler), which frees its
queue slot, prefix KV and pages at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from absl import logging
from aiohttp import web

from jdisagg.serving import openai_api
from jdisagg.serving.openai_api import ApiError
from jdisagg.serving.server import MAX_MESSAGE_BYTES, Rejected, Server, latency

STATUS = {  # gRPC code of a refusal -> HTTP status
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.CANCELLED: 499,
}
CODES = {status: code for code, status in STATUS.items()} | {413: grpc.StatusCode.INVALID_ARGUMENT}
OPEN_PATHS = ("/health",)
MAX_ERROR_CHARS = 1000  # an error message quotes at most this much of the request


class HttpApi:
    """The HTTP face of ``server`` on ``host:port``; ``start`` and ``stop`` run on the server's loop."""

    def __init__(self, server: Server, host: str, port: int):
        self.server, self.host, self.port = server, host, port
        self.started = int(time.time())
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES, middlewares=[self._guard])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/health", self._health)
        # handler_cancellation: a client that goes away cancels its handler, so its request;
        # shutdown_timeout: on stop (after the drain), streams still open get 1 s, as gRPC's grace.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.server.access.ssl_context())
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port picked for port 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- every request: the key, and errors as OpenAI error bodies ---------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if request.path not in OPEN_PATHS and not self.server.access.allows(request.headers.get("Authorization")):
            return self._error(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
        try:
            return await handler(request)
        except ApiError as e:
            return self._error(e.status, e.message, e.param, e.code)
        except web.HTTPException as e:  # no such route (404), wrong method (405), body too large (413)
            if e.status < 400:
                raise
            message = f"{request.method} {request.path[:200]}: {e.reason}"
            if e.status == 413:
                message = f"the request body is over the limit of {MAX_MESSAGE_BYTES:,} bytes"
            return self._error(e.status, message)
        except Exception as e:  # a bug: logged, and answered as JSON like every error
            logging.exception("HTTP %s %s failed", request.method, request.path[:200])
            return self._error(500, f"internal error: {type(e).__name__}")

    def _error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
        grpc_code = CODES.get(status)
        self.server.metrics.errors.labels(grpc_code.name if grpc_code else f"HTTP_{status}").inc()
        body = openai_api.error_body(status, message[:MAX_ERROR_CHARS], param, code)
        return web.Response(status=status, body=openai_api.dumps(body), content_type="application/json")

    def _rejected(self, r: Rejected) -> web.Response:
        return self._error(STATUS.get(r.code, 500), str(r))

    # ---- routes --------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        s = self.server
        if s.ready and not s.draining and not s.failed.is_set():
            return web.json_response({"status": "ok"})
        state = "failed" if s.failed.is_set() else "draining" if s.draining else "warming up"
        return web.json_response({"status": state}, status=503)

    def _model_card(self) -> dict:
        info = self.server.model_info()
        return {
            "id": info.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "jdisagg",
            "max_model_len": info.max_seq_len,
            "vocab_size": info.vocab_size,
            "mesh_preset": info.mesh_preset,
            "devices": len({d for inst in info.instances for d in inst.devices}),
        }

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: web.Request) -> web.Response:
        card = self._model_card()
        if request.match_info["model"] != card["id"]:
            raise ApiError(404, f"the model {request.match_info['model'][:200]!r} does not exist", "model")
        return web.json_response(card)

    async def _tokenize(self, request: web.Request) -> web.Response:
        raw = await request.read()
        intake, name = self.server.engine.intake, self.server.engine.model.card.name

        def encode() -> list[int]:
            body = openai_api.parse_json(raw)
            if body.get("model") not in (None, name):
                raise ApiError(404, f"the model {str(body['model'])[:200]!r} does not exist", "model")
            if "messages" in body:
                return intake.encode_chat(openai_api.chat_messages(body["messages"]))
            return intake.encode_text(openai_api.text_field(body.get("prompt"), "prompt"))

        try:
            ids = await self.server.off_loop(encode)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        limit = self.server.engine.preset.max_seq_len
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": limit})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        s = self.server
        name = s.engine.model.card.name
        try:
            call = await s.admit(lambda: openai_api.parse_call(kind, raw, s.engine.intake, name))
        except Rejected as r:
            return self._rejected(r)
        answer = openai_api.Answer(call, s.engine.tokenizer)
        try:
            if call.stream:
                return await self._stream(request, call, answer)
            outputs = []
            async with contextlib.aclosing(s.run(call.request)) as stream:
                async for out in stream:
                    outputs.append(out)
            body = answer.body(openai_api.merge(outputs), _latency(call))
            return web.Response(body=openai_api.dumps(body), content_type="application/json")
        except Rejected as r:
            return self._rejected(r)
        except asyncio.CancelledError:  # the client went away: run() has cancelled the request
            s.client_left(deadline=False)
            raise

    async def _stream(self, request: web.Request, call, answer) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async with contextlib.aclosing(self.server.run(call.request)) as stream:
                async for out in stream:
                    lat = _latency(call) if out.finished else None
                    events = b"".join(_event(c) for c in answer.chunks(out, lat))
                    if events:
                        await response.write(events)
        except Rejected as r:  # the status line is sent: the error goes in the stream
            status = STATUS.get(r.code, 500)
            self.server.metrics.errors.labels(r.code.name).inc()
            await response.write(_event(openai_api.error_body(status, str(r)[:MAX_ERROR_CHARS])))
        except ConnectionResetError:  # the client went away while we wrote
            self.server.client_left(deadline=False)
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _latency(call) -> dict:
    lat = latency(call.request)
    return {f.name: getattr(lat, f.name) for f in lat.DESCRIPTOR.fields}


def _event(value: dict) -> bytes:
    return b"data: " + openai_api.dumps(value) + b"\n\n"
