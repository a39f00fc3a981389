"""Real ``python -m jdisagg.serve --role ...`` processes on localhost for the multi-process
tests: a router and instance processes, each with its own JAX runtime and simulated CPU
devices, their stdout read on threads (ready lines), stderr in files, metrics scraped over HTTP.
Every wait is bounded, so a wedged process fails a test instead of hanging it."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 420.0  # seconds; every process compiles its programs (2 cores, several processes at once)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One ``jdisagg.serve`` process."""

    def __init__(self, name: str, log_dir: Path, *args: str, env: dict | None = None):
        self.name, self.log = name, log_dir / f"{name}.stderr.txt"
        self._stderr = open(self.log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jdisagg.serve", *args],
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.started = time.monotonic()
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace").replace("\r", "\n")
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first stdout line matching ``pattern`` (fails the test if the process exits first)."""
        regex = re.compile(pattern)
        for line in self.seen:
            if m := regex.match(line):
                return m
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{self.name}: no line /{pattern}/ within {timeout:.0f} s; stderr:\n{self.tail()}")
            if line is None:
                code = self.proc.wait(10)
                pytest.fail(f"{self.name} exited with {code}; stdout {self.seen}; stderr:\n{self.tail()}")
            self.seen.append(line)
            if m := regex.match(line):
                return m

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()
        self._stderr.close()


def metrics(port: int) -> dict[str, float]:
    """A process's Prometheus samples, by name with labels (``name{label="x"}``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    """Polls ``check()`` until it returns something true; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s (last: {value!r})")
        time.sleep(interval)


class Deployment:
    """A router and instance processes of one preset."""

    def __init__(self, log_dir: Path, model: str, mesh: str, *, router_args=(), instance_args=()):
        self.log_dir, self.model, self.mesh = log_dir, model, mesh
        self.instance_args = list(instance_args)
        self.router_metrics = free_port()
        common = ["--model", model, "--mesh", mesh]
        self.router = Proc(
            "router",
            log_dir,
            "--role",
            "router",
            *common,
            "--port",
            "0",
            "--control_port",
            "0",
            "--metrics_port",
            str(self.router_metrics),
            *router_args,
        )
        self.control = "127.0.0.1:" + self.router.wait_for(r"^jdisagg\.serve: control on \S+:(\d+)$", 120).group(1)
        self.target = "127.0.0.1:" + self.router.wait_for(r"^jdisagg\.serve: ready on \S+:(\d+)$", 60).group(1)
        self.instances: dict[str, Proc] = {}
        self.metrics_ports: dict[str, int] = {}

    def start(self, role: str, index: int, *extra: str, name: str | None = None, env=None, metrics=True) -> Proc:
        name = name or f"{role}{index}"
        args = ["--role", role, "--index", str(index), "--model", self.model, "--mesh", self.mesh]
        args += ["--port", "0", "--router", self.control, *self.instance_args, *extra]
        if metrics:
            self.metrics_ports[name] = free_port()
            args += ["--metrics_port", str(self.metrics_ports[name])]
        else:
            args += ["--metrics_port", "0"]
        self.instances[name] = proc = Proc(name, self.log_dir, *args, env=env)
        return proc

    def wait_ready(self, names=None, timeout: float = START_TIMEOUT) -> None:
        for name in names or list(self.instances):
            self.instances[name].wait_for(r"^jdisagg\.serve: ready ", timeout)

    def serving(self, role: str) -> int:
        return int(metrics(self.router_metrics).get(f'jdisagg_router_instances{{role="{role}"}}', 0))

    def metrics(self, name: str) -> dict[str, float]:
        return metrics(self.metrics_ports[name])

    def stop(self) -> None:
        for proc in self.instances.values():
            proc.stop()
        self.router.stop()
