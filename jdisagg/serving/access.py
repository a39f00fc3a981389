"""Who may call the servers, and over what: an optional bearer API key and optional TLS, the
same for the gRPC service and the HTTP API.

With an ``api_key``, every call must carry ``authorization: Bearer KEY`` (gRPC metadata or
the HTTP header); the gRPC health service, server reflection and HTTP ``GET /health`` stay
open, so load balancers and probes need no key. Keys are compared in constant time. With
``tls_cert`` and ``tls_key`` (PEM files) both servers speak TLS only.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import ssl

import grpc
import grpc.aio

API_KEY_ENV = "JDISAGG_API_KEY"  # where jdisagg.serve and the clients look for a key not given as a flag
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


@dataclasses.dataclass(frozen=True)
class Access:
    """The API key (None: no key needed) and the TLS certificate chain and key files (None: plaintext)."""

    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls_cert) and its key (--tls_key)")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"no TLS file {path}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` header value (``Bearer KEY``) carries the key."""
        if self.api_key is None:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        with open(self.tls_key, "rb") as key, open(self.tls_cert, "rb") as cert:
            return grpc.ssl_server_credentials([(key.read(), cert.read())])

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def grpc_interceptors(self, on_refused) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors that refuse calls without the key (none when no key is set);
        ``on_refused()`` is called for each refused call (metrics)."""
        return [] if self.api_key is None else [_KeyCheck(self, on_refused)]


def key_from_env(api_key: str | None) -> str | None:
    """``api_key`` if given, else ``$JDISAGG_API_KEY`` if set and non-empty, else None."""
    return api_key or os.environ.get(API_KEY_ENV) or None


class _KeyCheck(grpc.aio.ServerInterceptor):
    def __init__(self, access: Access, on_refused):
        self.access, self.on_refused = access, on_refused

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service = details.method.lstrip("/").partition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.access.allows(metadata.get("authorization")):
            return handler
        self.on_refused()
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer KEY)")

    async def refuse_stream(request, context):
        await refuse(request, context)
        yield  # an async generator, as a streaming handler must be

    kind = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kind)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kind)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kind)
    return grpc.unary_unary_rpc_method_handler(refuse, **kind)
