"""``python -m jdisagg.serve --role local``: a whole mesh preset as processes on this host — a
router and one process per prefill and decode instance — supervised by this process.

    python -m jdisagg.serve --role local --mesh cpu-2p2d --model tiny-llama --port 50051

Every flag given is passed on (``--role`` and the ports aside). The router listens on
``--port`` (and ``--http_port``) and takes joins on ``--control_port``; the instances listen on
free ports and, with ``--metrics_port P``, export metrics on P + 1, P + 2, ... in preset order
(the router on P). With ``--visible_devices_env CUDA_VISIBLE_DEVICES`` (or another
variable) each instance process sees only its own devices (numbered from 0 there), so
processes on one GPU host do not claim each other's memory. An instance process that dies
is started again after ``--restart_after_s``; SIGTERM or Ctrl-C drains the router first,
then the instances.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from absl import flags, logging

from jdisagg.preset import load_preset
from jdisagg.serving.roles import RESTART_AFTER_S, VISIBLE

_OWN = {"role", "port", "metrics_port", "control_port", "router", "index", "devices", "visible_devices_env"}


def _passed_on(argv: list[str]) -> list[str]:
    """``argv`` without the flags the launcher sets per process (none of them is a boolean)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-") and a.lstrip("-").split("=", 1)[0] in _OWN:
            skip = "=" not in a
        else:
            out.append(a)
    return out


class _Child:
    def __init__(self, name: str, args: list[str], env: dict):
        self.name, self.args, self.env = name, args, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        logging.info("starting %s", self.name)
        self.proc = subprocess.Popen([sys.executable, "-m", "jdisagg.serve", *self.args], env=self.env)


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    preset = load_preset(f.mesh)
    common = _passed_on(argv)
    host = f.host if f.host not in ("0.0.0.0", "::") else "127.0.0.1"
    control = f.control_port
    metrics = f.metrics_port
    router_args = [*common, "--role", "router", "--port", str(f.port), "--control_port", str(control)]
    router_args += ["--metrics_port", str(metrics)]
    router = _Child("router", router_args, dict(os.environ))
    if any(s.role not in ("prefill", "decode") for s in preset.instances):
        print(f"jdisagg.serve: error: {preset.name}: --role local runs prefill and decode instances", file=sys.stderr)
        sys.exit(2)
    children = []
    for k, spec in enumerate(preset.instances):
        args = [*common, "--role", spec.role, "--index", str(spec.index), "--port", "0"]
        args += ["--router", f"{host}:{control}", "--metrics_port", str(metrics + 1 + k if metrics else 0)]
        env = dict(os.environ)
        if VISIBLE.value:
            env[VISIBLE.value] = ",".join(map(str, spec.devices))
            args += ["--devices", ",".join(map(str, range(len(spec.devices))))]
        children.append(_Child(spec.where, args, env))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    router.start()
    for c in children:
        c.start()
    print(f"jdisagg.serve: started {len(children)} instance processes behind the router on port {f.port}", flush=True)
    dead_since: dict[str, float] = {}
    code = 0
    while not stop.wait(0.5):
        if router.proc.poll() is not None:
            print(f"jdisagg.serve: error: the router exited with {router.proc.returncode}", file=sys.stderr)
            code = 1
            break
        for c in children:
            if c.proc.poll() is None:
                continue
            since = dead_since.setdefault(c.name, time.monotonic())
            if time.monotonic() - since >= RESTART_AFTER_S.value:
                logging.warning("%s exited with %s; starting it again", c.name, c.proc.returncode)
                del dead_since[c.name]
                c.start()
    for group in ([router], children):  # the router drains first, while the instances still serve
        for c in group:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        for c in group:
            try:
                c.proc.wait(f.drain_timeout + 10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
    sys.exit(code)
