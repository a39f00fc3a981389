"""Client library for the jdisagg serving API (``jdisagg.v1.Generation`` over gRPC); its
command line is ``python -m jdisagg.client``.

The library has a blocking ``Client`` and an ``AsyncClient`` (``grpc.aio``) with the same methods:

    from jdisagg.client import Client

    with Client("127.0.0.1:50051") as client:
        for response in client.generate([{"role": "user", "content": "Hi!"}], max_tokens=32):
            print(response.text, end="", flush=True)
        done = client.complete("Once upon a time", max_tokens=16, temperature=0.7, seed=1)
        print(done.text, done.finish_reason, done.final.latency.ttft_s)

A prompt is text (``str``), token ids (``list[int]``) or chat messages (``list[dict]`` with
"role" and "content"). ``generate`` streams ``GenerateResponse`` messages; leaving its ``with``
block, ``close()`` or ``cancel()`` before the end cancels the request on the server, and so
does dropping the stream. A failed call raises ``grpc.RpcError`` (``grpc.aio.AioRpcError``)
with the server's status code.

For a server started with ``--api_key`` pass ``api_key=`` (sent as ``authorization: Bearer
KEY``); for one with ``--tls_cert`` pass ``tls=True`` (system roots) or ``root_cert=`` (a PEM
file, e.g. the server's own self-signed certificate).
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

Messages = Sequence[Mapping[str, str]]  # chat messages: {"role": ..., "content": ...}
Prompt = str | Sequence[int] | Messages  # text, token ids or chat messages


# ---- requests -------------------------------------------------------------------------------


def _chat(messages: Messages) -> pb.ChatMessages:
    chat = pb.ChatMessages()
    for m in messages:
        if not isinstance(m, Mapping) or not {"role", "content"} <= m.keys():
            raise TypeError(f"a chat message is a dict with 'role' and 'content', not {m!r}")
        chat.messages.add(role=m["role"], content=m["content"])
    return chat


def make_request(
    prompt: Prompt,
    *,
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int = 0,
    slo_ttft: float = 0.0,
    slo_tpot: float = 0.0,
    request_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest; zero values mean the server's defaults (max_tokens 64, top_p 1, no SLO).

    ``logprobs`` asks for that many top alternatives per token; ``slo_ttft`` and ``slo_tpot``
    are latency targets in seconds; ``request_id`` comes back in the final message.
    """
    for name, value in [("max_tokens", max_tokens), ("top_k", top_k), ("logprobs", logprobs), ("seed", seed)]:
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 (got {value})")
    request = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and len(prompt) and isinstance(prompt[0], Mapping):
        request.chat.CopyFrom(_chat(prompt))
    else:
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise TypeError(f"a prompt is text, token ids or chat messages, not {prompt!r:.80}") from None
        request.token_ids.SetInParent()  # set even when empty, so the server sees an empty prompt
        request.token_ids.ids.extend(ids)
    s = request.sampling
    s.max_tokens, s.temperature, s.top_p, s.top_k = max_tokens, temperature, top_p, top_k
    if seed is not None:
        s.seed = seed
    s.stop.extend([stop] if isinstance(stop, str) else stop)
    s.stop_token_ids.extend(stop_token_ids)
    s.ignore_eos, s.logprobs = ignore_eos, logprobs
    if slo_ttft or slo_tpot:
        request.slo.ttft_s, request.slo.tpot_s = slo_ttft, slo_tpot
    return request


def make_tokenize_request(prompt: str | Messages, add_special_tokens: bool) -> pb.TokenizeRequest:
    """A TokenizeRequest for text or chat messages."""
    request = pb.TokenizeRequest(add_special_tokens=add_special_tokens)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.chat.CopyFrom(_chat(prompt))
    return request


# ---- responses ------------------------------------------------------------------------------


@dataclasses.dataclass
class Completion:
    """The messages of one Generate stream, collected: what ``complete`` returns."""

    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list[pb.TokenLogprob] = dataclasses.field(default_factory=list)  # one per token, when asked for
    final: pb.FinalInfo | None = None  # finish reason, token counts, latency; set by the last message

    @property
    def finish_reason(self) -> str:
        return self.final.finish_reason if self.final else ""

    def add(self, response: pb.GenerateResponse) -> None:
        self.token_ids += response.token_ids
        self.text += response.text
        self.logprobs += response.logprobs
        if response.HasField("final"):
            self.final = response.final

    def check(self) -> Completion:
        if self.final is None:
            raise RuntimeError("the server ended the Generate stream without a final message")
        return self


class ResponseStream:
    """The GenerateResponse messages of one Generate call; cancelling it cancels the request."""

    def __init__(self, call: Any):  # a grpc.Call that is also an iterator of responses
        self.call = call
        self._cancelled = False

    def __iter__(self) -> ResponseStream:
        return self

    def __next__(self) -> pb.GenerateResponse:
        try:
            return next(self.call)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None  # we stopped it: end quietly
            raise

    def cancel(self) -> bool:
        """Cancels the request; True if it was still running."""
        self._cancelled = True
        return self.call.cancel()

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()


class AsyncResponseStream:
    """The async counterpart of ResponseStream, over a ``grpc.aio`` call."""

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        self.call = call
        self._cancelled = False

    def __aiter__(self) -> AsyncResponseStream:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            response = await self.call.read()
        except asyncio.CancelledError:
            if self._cancelled:  # we stopped it; otherwise the awaiting task itself is being cancelled
                raise StopAsyncIteration from None
            raise
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return response

    def cancel(self) -> bool:
        """Cancels the request; True if it was still running."""
        self._cancelled = True
        return self.call.cancel()

    def close(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncResponseStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.cancel()


def _health_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


_HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="")  # "": the server as a whole


# ---- clients --------------------------------------------------------------------------------


def _credentials(tls: bool, root_cert: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (None: plaintext); ``root_cert`` is a PEM file of trusted roots."""
    if not (tls or root_cert):
        return None
    roots = None
    if root_cert:
        with open(root_cert, "rb") as f:
            roots = f.read()
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _call_options(timeout: float | None, api_key: str | None) -> dict:
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    return dict(timeout=timeout, metadata=metadata)


class Client:
    """A blocking client on one channel; ``timeout`` (seconds) bounds every call, a whole stream
    included; ``api_key``, ``tls`` and ``root_cert`` are for secured servers (module docstring)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_cert: str | None = None,
    ):
        self.target, self.timeout = target, timeout
        credentials = _credentials(tls, root_cert)
        self._channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._options = _call_options(timeout, api_key)

    def generate(self, prompt: Prompt, **sampling) -> ResponseStream:
        """Streams the output of one request; ``sampling`` takes make_request's keywords."""
        return ResponseStream(self._stub.Generate(make_request(prompt, **sampling), **self._options))

    def complete(self, prompt: Prompt, **sampling) -> Completion:
        """Runs one request to the end and returns all its output."""
        completion = Completion()
        with self.generate(prompt, **sampling) as stream:
            for response in stream:
                completion.add(response)
        return completion.check()

    def tokenize(self, prompt: str | Messages, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        """Token ids (and their vocabulary entries) of text or chat messages, as Generate sees them."""
        return self._stub.Tokenize(make_tokenize_request(prompt, add_special_tokens), **self._options)

    def model_info(self) -> pb.ModelInfoResponse:
        return self._stub.ModelInfo(pb.ModelInfoRequest(), **self._options)

    def health(self) -> str:
        """The server's grpc.health.v1 status: "SERVING", "NOT_SERVING", ..."""
        return _health_name(self._health.Check(_HEALTH_REQUEST, timeout=self.timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient:
    """Client's methods as coroutines on a ``grpc.aio`` channel; create it in the event loop that uses it."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_cert: str | None = None,
    ):
        self.target, self.timeout = target, timeout
        credentials = _credentials(tls, root_cert)
        aio = grpc.aio
        self._channel = aio.secure_channel(target, credentials) if credentials else aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._options = _call_options(timeout, api_key)

    def generate(self, prompt: Prompt, **sampling) -> AsyncResponseStream:
        """Streams the output of one request (``async for``); ``sampling`` takes make_request's keywords."""
        return AsyncResponseStream(self._stub.Generate(make_request(prompt, **sampling), **self._options))

    async def complete(self, prompt: Prompt, **sampling) -> Completion:
        completion = Completion()
        async with self.generate(prompt, **sampling) as stream:
            async for response in stream:
                completion.add(response)
        return completion.check()

    async def tokenize(self, prompt: str | Messages, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return await self._stub.Tokenize(make_tokenize_request(prompt, add_special_tokens), **self._options)

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self._stub.ModelInfo(pb.ModelInfoRequest(), **self._options)

    async def health(self) -> str:
        return _health_name(await self._health.Check(_HEALTH_REQUEST, timeout=self.timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
