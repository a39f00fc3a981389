"""Run the gRPC server (and, with ``--http_port``, the OpenAI-compatible HTTP API).

    python -m jdisagg.serve --mesh cpu --model smollm2-135m-instruct --port 50051 --http_port 8000

Listens at once (answering UNAVAILABLE and health NOT_SERVING while it compiles every
program shape), then serves. SIGTERM or Ctrl-C drains: no new requests, in-flight ones
finish, then the process exits. Prometheus metrics are on ``--metrics_port``. ``--api_key``
(or ``$JDISAGG_API_KEY``) makes both protocols require ``authorization: Bearer KEY``;
``--tls_cert`` and ``--tls_key`` make both speak TLS only.

``--role`` runs one process of a deployment whose instances are processes of their own
(a router, one prefill or decode instance, or a whole preset on this host: ``--role local``);
see ``jdisagg/serving/roles.py``. The default, ``single``, serves every instance in this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import app, flags, logging

from jdisagg import cards, platform
from jdisagg.serving import roles

_MODEL = flags.DEFINE_string("model", cards.DEFAULT_MODEL, "Model card name (models/), card file, .gguf, or directory.")
_MESH = flags.DEFINE_string("mesh", "cpu", "Mesh preset name (meshes/) or .toml file.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 to serve other hosts.")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port.")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 9090, "Prometheus /metrics port; 0 turns it off.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 1024, "Requests waiting for prefill before RESOURCE_EXHAUSTED.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the card's dtype.")
_DRAIN_TIMEOUT = flags.DEFINE_float("drain_timeout", 60.0, "Seconds to let in-flight requests finish on SIGTERM.")
_HTTP_PORT = flags.DEFINE_integer("http_port", None, "OpenAI-compatible HTTP API port (0 picks one); unset: off.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require this bearer key on gRPC and HTTP (default $JDISAGG_API_KEY).")
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate chain: gRPC and HTTP over TLS (with --tls_key).")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.")
_RECORD_TRACE = flags.DEFINE_string(
    "record_trace", None, "Append each finished request (arrival, input, output lengths; no text) to this JSONL file."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"jdisagg.serve: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    from jdisagg.engine import Engine
    from jdisagg.serving.access import Access, key_from_env
    from jdisagg.serving.server import Server

    def make_server(engine) -> Server:  # an Engine, or a router's Cluster of instance processes
        return Server(
            engine,
            host=_HOST.value,
            port=_PORT.value,
            max_queue=_MAX_QUEUE.value,
            http_port=_HTTP_PORT.value,
            access=access,
            record_trace=_RECORD_TRACE.value,
        )

    try:
        access = Access(key_from_env(_API_KEY.value), _TLS_CERT.value, _TLS_KEY.value)
        if roles.ROLE.value != "single":
            common = dict(host=_HOST.value, metrics_port=_METRICS_PORT.value, drain_timeout=_DRAIN_TIMEOUT.value)
            return roles.main(model=_MODEL.value, mesh=_MESH.value, dtype=_DTYPE.value, server=make_server, **common)
        engine = Engine(_MODEL.value, _MESH.value, dtype=_DTYPE.value, warm_up=False)
        server = make_server(engine)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # OSError: unreadable TLS files
        print(f"jdisagg.serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    if _METRICS_PORT.value:
        server.metrics.start(_METRICS_PORT.value, _HOST.value)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        server.start()
    except OSError as e:  # the HTTP port is taken
        print(f"jdisagg.serve: error: {e}", file=sys.stderr)
        server.stop()
        sys.exit(2)
    logging.info("listening on %s:%d; compiling", _HOST.value, server.port)
    failed = []

    def compile_all():
        try:
            engine.warm_up()
        except Exception as e:  # e.g. out of memory: the server must not come up half-compiled
            logging.exception("warm-up failed")
            failed.append(e)

    warm_up = threading.Thread(target=compile_all, daemon=True)
    warm_up.start()
    while warm_up.is_alive() and not stop.is_set():
        warm_up.join(0.2)
    if failed:
        print(f"jdisagg.serve: error: warm-up failed: {failed[0]}", file=sys.stderr)
        server.stop()
        os._exit(1)
    if stop.is_set():  # stopped while compiling: nothing was accepted yet
        logging.info("stopped during warm-up")
        server.stop()
        os._exit(0)  # the compiler thread cannot be interrupted
    server.set_ready()
    if server.http is not None:
        scheme = "https" if access.tls else "http"
        print(f"jdisagg.serve: HTTP API on {scheme}://{_HOST.value}:{server.http.port}/v1", flush=True)
    print(f"jdisagg.serve: ready on {_HOST.value}:{server.port}", flush=True)
    while not stop.wait(0.2):
        if server.failed.is_set():  # its requests have their errors; a fresh process is the way out
            print("jdisagg.serve: error: a worker failed (see the log); exiting", file=sys.stderr)
            server.stop()
            os._exit(1)
    logging.info("draining")
    server.drain(timeout=_DRAIN_TIMEOUT.value)


if __name__ == "__main__":
    platform.simulate_cpu_devices()
    platform.enable_compilation_cache()
    app.run(main)
