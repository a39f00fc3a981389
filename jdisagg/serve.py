"""Run the gRPC server.

    python -m jdisagg.serve --mesh cpu --model smollm2-135m-instruct --port 50051

Listens at once (answering UNAVAILABLE and health NOT_SERVING while it compiles every
program shape), then serves. SIGTERM or Ctrl-C drains: no new requests, in-flight ones
finish, then the process exits. Prometheus metrics are on ``--metrics_port``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import app, flags, logging

from jdisagg import cards, platform

_MODEL = flags.DEFINE_string("model", cards.DEFAULT_MODEL, "Model card name (models/), card file, .gguf, or directory.")
_MESH = flags.DEFINE_string("mesh", "cpu", "Mesh preset name (meshes/) or .toml file.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 to serve other hosts.")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port.")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 9090, "Prometheus /metrics port; 0 turns it off.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 1024, "Requests waiting for prefill before RESOURCE_EXHAUSTED.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the card's dtype.")
_DRAIN_TIMEOUT = flags.DEFINE_float("drain_timeout", 60.0, "Seconds to let in-flight requests finish on SIGTERM.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"jdisagg.serve: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    from jdisagg.engine import Engine
    from jdisagg.serving.server import Server

    try:
        engine = Engine(_MODEL.value, _MESH.value, dtype=_DTYPE.value, warm_up=False)
        server = Server(engine, host=_HOST.value, port=_PORT.value, max_queue=_MAX_QUEUE.value)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"jdisagg.serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    if _METRICS_PORT.value:
        server.metrics.start(_METRICS_PORT.value, _HOST.value)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
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
