"""``python -m jdisagg.serve --role ...``: one process of a deployment whose instances run in
processes of their own (README "Instances as processes"; ``launch/`` has the scripts).

    --role single     the default: every instance of the preset in this process, behind the server
    --role router     the public API in front of instance processes (``serving.router``); they
                      join it on --control_port
    --role prefill    one prefill or decode instance of the preset (--index), which joins the
    --role decode     router at --router (``serving.instance``)
    --role local      the whole preset as processes on this host: a router and one process per
                      instance (``serving.launcher``)

An instance whose devices span hosts runs as one multi-controller JAX program: start one
process per host with the same flags plus --coordinator, --num_processes and --process_id
(``jax.distributed.initialize``); process 0 serves the instance, the others follow it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import flags, logging

ROLES = ("single", "router", "prefill", "decode", "local")

ROLE = flags.DEFINE_enum("role", "single", ROLES, "What this process runs (see jdisagg/serving/roles.py).")
INDEX = flags.DEFINE_integer("index", 0, "prefill/decode: which [[prefill]] / [[decode]] instance of the preset.")
ROUTER = flags.DEFINE_string("router", None, "prefill/decode: the router's control address (host:port) to join.")
CONTROL_PORT = flags.DEFINE_integer("control_port", 50052, "router: port instances join on (0 picks one).")
ADVERTISE = flags.DEFINE_string(
    "advertise_host", None, "prefill/decode: the address others reach this process at (default --host)."
)
DEVICES = flags.DEFINE_list(
    "devices", None, "prefill/decode: this process's device indices for the instance (default: the preset's)."
)
LEASE_S = flags.DEFINE_float("lease_s", 60.0, "prefill: seconds a prefix is held for decode to pull it.")
TRANSFER_TIMEOUT_S = flags.DEFINE_float("transfer_timeout_s", 10.0, "decode: seconds one KV pull may take.")
OVERLAP_PULLS = flags.DEFINE_bool(
    "overlap_pulls", True, "decode: keep stepping while a prefix's KV arrives (one-process instances)."
)
KV_CHECKSUM = flags.DEFINE_bool("kv_checksum", False, "Check every pulled prefix against the prefill's checksum.")
HEARTBEAT_S = flags.DEFINE_float("heartbeat_s", 0.5, "router: seconds between an instance's load reports.")
DEAD_AFTER_S = flags.DEFINE_float("dead_after_s", 3.0, "router: an instance silent this long is dropped.")
MAX_RETRIES = flags.DEFINE_integer(
    "max_retries", 3, "router: times a request is recomputed after failures before it ends UNAVAILABLE."
)
COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Multi-host instance: process 0's host:port; auto: let JAX find it (TPU VM slices)."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-host instance: its JAX processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-host instance: this process's index.")
TEST_FAULTS = flags.DEFINE_bool("test_faults", False, "prefill/decode: accept the Fault RPC (tests only).")
VISIBLE = flags.DEFINE_string(
    "visible_devices_env", None, "local: give each instance process only its devices through this variable."
)
RESTART_AFTER_S = flags.DEFINE_float("restart_after_s", 2.0, "local: restart a dead instance process after this.")


def _exit_on_signals() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _error(message: str, code: int = 2):
    print(f"jdisagg.serve: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(*, model: str, mesh: str, dtype: str | None, host: str, metrics_port: int, drain_timeout: float, server):
    """Runs ``ROLE`` (not "single"); ``server(engine)`` makes the public server (the router's)."""
    role = ROLE.value
    if role == "local":
        from jdisagg.serving import launcher

        return launcher.main(sys.argv[1:])
    if role == "router":
        return _router(model, mesh, dtype, host, metrics_port, drain_timeout, server)
    return _instance(role, model, mesh, dtype, host, metrics_port, drain_timeout)


def _router(model, mesh, dtype, host, metrics_port, drain_timeout, make_server) -> None:
    from jdisagg import cards
    from jdisagg.preset import load_preset
    from jdisagg.serving.router import Cluster

    try:
        preset = load_preset(mesh)
        loaded = cards.open_model(cards.load_card(model), dtype)
        loaded._host_params = None  # the router only tokenizes
        cluster = Cluster(
            loaded,
            preset,
            heartbeat_s=HEARTBEAT_S.value,
            dead_after_s=DEAD_AFTER_S.value,
            max_retries=MAX_RETRIES.value,
        )
        server = make_server(cluster)
        control = cluster.attach(server, host, CONTROL_PORT.value)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        _error(str(e))
    if metrics_port:
        server.metrics.start(metrics_port, host)
    stop = _exit_on_signals()
    server.start()
    if server.http is not None:
        print(f"jdisagg.serve: HTTP API on port {server.http.port}", flush=True)
    print(f"jdisagg.serve: control on {host}:{control}", flush=True)
    print(f"jdisagg.serve: ready on {host}:{server.port}", flush=True)  # health SERVING once a pair joined
    stop.wait()
    logging.info("draining")
    server.drain(timeout=drain_timeout)


def _instance(role, model, mesh, dtype, host, metrics_port, drain_timeout) -> None:
    if NUM_PROCESSES.value > 1:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if COORDINATOR.value == "auto":  # a TPU VM slice (or a cluster JAX detects): it finds its peers
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    from jdisagg import cards
    from jdisagg.preset import load_preset
    from jdisagg.serving.instance import InstanceServer

    stop = _exit_on_signals()
    try:
        preset = load_preset(mesh)
        loaded = cards.open_model(cards.load_card(model), dtype)
        instance = InstanceServer(
            loaded,
            preset,
            role,
            INDEX.value,
            host=host,
            port=flags.FLAGS.port,
            advertise=ADVERTISE.value,
            router=ROUTER.value,
            devices=tuple(int(d) for d in DEVICES.value) if DEVICES.value else None,
            lease_s=LEASE_S.value,
            transfer_timeout_s=TRANSFER_TIMEOUT_S.value,
            checksum=KV_CHECKSUM.value,
            overlap_pulls=OVERLAP_PULLS.value,
            test_faults=TEST_FAULTS.value,
        )
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        _error(str(e))
    if instance.follower:  # process > 0 of a multi-host instance: the same device calls as process 0
        instance.warm_up()
        print(f"jdisagg.serve: following {instance.name} (process {PROCESS_ID.value} of {NUM_PROCESSES.value})")
        sys.stdout.flush()
        instance.follow()  # returns when process 0 stops the instance
        os._exit(0)
    if metrics_port:
        try:
            instance.metrics.start(metrics_port, host)
        except OSError as e:
            _error(f"metrics port {metrics_port}: {e}")
        print(f"jdisagg.serve: metrics on {host}:{metrics_port}", flush=True)
    logging.info("%s listening on %s; compiling", instance.name, instance.control)
    try:
        instance.warm_up()
    except Exception as e:  # e.g. out of memory: do not join half-compiled
        logging.exception("warm-up failed")
        print(f"jdisagg.serve: error: warm-up failed: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    instance.start()
    print(f"jdisagg.serve: ready {instance.name} on {instance.control}", flush=True)
    while not stop.wait(0.2):
        if instance.failed.is_set():
            print("jdisagg.serve: error: the worker failed (see the log); exiting", file=sys.stderr, flush=True)
            os._exit(1)
    logging.info("draining")
    instance.drain(timeout=drain_timeout)
    os._exit(0)
