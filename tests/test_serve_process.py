"""End to end against a real ``python -m jdisagg.serve`` process (tiny-llama, prefill tp=4 -> decode pp=2 x tp=2).

One server process serves the whole module; the process sets up its own 8 simulated CPU
devices (jdisagg/platform.py) and compiles every program shape before it prints its ready
line (a few seconds with a warm ~/.cache/jdisagg/xla, ~35 s cold on 2 cores). The SIGTERM
drain test stops it, so it runs last.
"""

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jdisagg.engine import Engine
from jdisagg.preset import load_preset
from jdisagg.sched.params import SamplingParams
from jdisagg.serving.client import AsyncClient, Client

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"^jdisagg\.serve: ready on (\S+):(\d+)$")
HTTP_READY = re.compile(r"^jdisagg\.serve: HTTP API on (\S+)/v1$")
START_TIMEOUT = 240.0  # seconds; warm-up compiles every program shape (cold cache: ~35 s here)
CALL_TIMEOUT = 120.0  # seconds; bounds every RPC, so a wedged server fails the test instead of hanging it
SERVICE = "jdisagg.v1.Generation"
MESH = "cpu-tp4-pp2tp2"  # prefill tp=4 -> decode pp=2 x tp=2
# Its context cut to 256 tokens (the longest case is 120 + 24): the server compiles fewer
# length buckets and one page-table width.
MESH_FILE = (ROOT / "meshes" / f"{MESH}.toml").read_text().replace("max_seq_len = 512", "max_seq_len = 256")


class ServeProcess:
    """``python -m jdisagg.serve`` in a subprocess; stdout read on a thread, stderr to a file."""

    def __init__(self, log: Path, *args: str):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.log = log
        self._stderr = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jdisagg.serve", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.http_url: str | None = None  # from the "HTTP API on" line (--http_port)
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:  # keeps reading after the ready line, so the pipe never fills
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").replace("\r", "\n")  # progress bars use \r
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def wait_ready(self, timeout: float) -> str:
        """host:port from the ready line; fails the test if the process dies or is too slow."""
        deadline = self.started + timeout
        seen = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no ready line within {timeout:.0f} s; stdout {seen}; stderr:\n{self.stderr_tail()}")
            if line is None:
                code = self.proc.wait(10)
                pytest.fail(
                    f"jdisagg.serve exited with {code} before ready; stdout {seen}; stderr:\n{self.stderr_tail()}"
                )
            seen.append(line)
            if http := HTTP_READY.match(line):
                self.http_url = http.group(1)
            match = READY.match(line)
            if match:
                self.ready_after = time.monotonic() - self.started
                return f"{match.group(1)}:{match.group(2)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """The preset file the server runs."""
    assert "max_seq_len = 256" in MESH_FILE
    path = tmp_path_factory.mktemp("mesh") / f"{MESH}.toml"
    path.write_text(MESH_FILE)
    return str(path)


@pytest.fixture(scope="module")
def process(tmp_path_factory, mesh):
    """The server process, started (not necessarily ready yet)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    server = ServeProcess(
        log,
        "--model",
        "tiny-llama",
        "--mesh",
        mesh,
        "--port",
        "0",
        "--metrics_port",
        "0",
        "--http_port",
        "0",
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def target(process):
    """host:port of the ready server."""
    address = process.wait_ready(START_TIMEOUT)
    print(f"jdisagg.serve ready after {process.ready_after:.1f} s")
    return address


@pytest.fixture(scope="module")
def offline():
    return Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)


def _cases(n: int = 32) -> list[tuple[list[int], dict]]:
    """Token-id prompts of 1..120 tokens with mixed sampling settings (client keywords)."""
    rng = np.random.default_rng(2024)
    cases = []
    for i in range(n):
        ids = rng.integers(3, 256, int(rng.integers(1, 121))).tolist()
        if i < 2:
            ids = ids[:1] if i == 0 else rng.integers(3, 256, 120).tolist()  # both ends of the range
        sampling = dict(max_tokens=int(rng.integers(1, 25)), ignore_eos=bool(i % 2))
        if i % 3 == 0:
            sampling.update(temperature=float(rng.choice([0.5, 0.8, 1.3])), top_k=int(rng.choice([0, 5, 40])))
            sampling.update(top_p=float(rng.choice([0.7, 0.9, 1.0])), seed=1000 + i)
        if i % 4 == 1:
            sampling["stop_token_ids"] = rng.integers(3, 256, 12).tolist()
        cases.append((ids, sampling))
    cases[5][1]["max_tokens"] = 1
    cases[7][1]["max_tokens"] = 24
    return cases


def _params(sampling: dict) -> SamplingParams:
    kw = dict(sampling)
    kw["stop_token_ids"] = tuple(kw.get("stop_token_ids", ()))
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def expected(process, offline):
    """The offline engine's outputs for _cases(), computed while the server process warms up."""
    cases = _cases()
    return cases, offline.generate([ids for ids, _ in cases], [_params(s) for _, s in cases])


def test_concurrent_streams_equal_offline(expected, target, mesh):
    cases, want = expected

    async def one(client: AsyncClient, ids, sampling):
        async with client.generate(ids, **sampling) as stream:
            return [m async for m in stream]

    async def run_all():
        async with AsyncClient(target, timeout=CALL_TIMEOUT) as client:
            assert await client.health() == "SERVING"
            return await asyncio.gather(*(one(client, ids, sampling) for ids, sampling in cases))

    results = asyncio.run(run_all())
    for i, (messages, w, (ids, sampling)) in enumerate(zip(results, want, cases, strict=True)):
        tokens = [t for m in messages for t in m.token_ids]
        assert tokens == w.tokens, (i, sampling)
        assert all(m.token_ids for m in messages[:-1]), i  # every streamed message carries tokens
        assert [m.HasField("final") for m in messages] == [False] * (len(messages) - 1) + [True], i
        final = messages[-1].final
        assert final.finish_reason == w.finish_reason, (i, sampling)
        assert final.completion_tokens == len(w.tokens) and final.prompt_tokens == len(ids)
        assert final.latency.e2e_s >= final.latency.ttft_s > 0
        assert (final.latency.transfer_bytes > 0) == (len(w.tokens) > 1)  # done after prefill: nothing to move
        assert all(m.text == "" for m in messages)  # tiny-llama has no tokenizer
    assert {w.finish_reason for w in want} == {"length", "stop"}  # both endings are exercised
    # Tokens came as the decode calls made them, not at the end: a pipelined instance makes
    # steps_per_call tokens of a request per call (messages may still merge under load).
    [spec] = load_preset(mesh).decode
    calls = sum(-(-len(w.tokens) // spec.steps_per_call) for w in want)
    assert spec.steps_per_call > 1 and sum(len(m) for m in results) >= len(cases) + calls // 2


def test_http_api_streams_equal_offline(expected, process, target):
    """The process's OpenAI-compatible API (--http_port) gives the offline tokens too."""
    import openai

    cases, want = expected
    fields = ("temperature", "top_k", "top_p", "seed", "ignore_eos", "stop_token_ids")

    async def one(client, ids, sampling):
        extra = {k: sampling[k] for k in fields if k in sampling}
        extra.setdefault("temperature", 0.0)
        stream = await client.completions.create(
            model="tiny-llama", prompt=ids, max_tokens=sampling["max_tokens"], stream=True, extra_body=extra
        )
        return [chunk async for chunk in stream]

    async def run_all():
        url = process.http_url + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=CALL_TIMEOUT) as client:
            return await asyncio.gather(*(one(client, ids, sampling) for ids, sampling in cases[:12]))

    assert process.http_url and process.http_url.startswith("http://127.0.0.1:")
    for i, (chunks, w) in enumerate(zip(asyncio.run(run_all()), want, strict=False)):
        assert [t for c in chunks for t in c.choices[0].token_ids] == w.tokens, i
        assert chunks[-1].choices[0].finish_reason == w.finish_reason and chunks[-1].latency["ttft_s"] > 0, i


def test_health_and_reflection(target):
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service

        # What grpcurl does: list the services, fetch the file defining one, build its messages from it.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="jdisagg.v1.NoSuchThing"),
        ]
        listed, file, missing = reflection.ServerReflectionInfo(iter(asks), timeout=CALL_TIMEOUT)
        services = {s.name for s in listed.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= services, services
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in file.file_descriptor_response.file_descriptor_proto
        ]
        [proto] = files  # jdisagg.proto imports nothing, so its file comes alone
        assert proto.name == "jdisagg/proto/jdisagg.proto" and proto.package == "jdisagg.v1"
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        [service] = [s for s in proto.service if s.name == "Generation"]
        methods = {m.name: m.server_streaming for m in service.method}
        assert methods == {"Generate": True, "Tokenize": False, "ModelInfo": False}

        request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("jdisagg.v1.GenerateRequest"))
        response_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("jdisagg.v1.GenerateResponse"))
        request = request_class()
        request.token_ids.ids.extend([5, 6, 7])
        request.sampling.max_tokens = 3
        request.sampling.ignore_eos = True
        generate = channel.unary_stream(
            f"/{SERVICE}/Generate",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        responses = list(generate(request, timeout=CALL_TIMEOUT))
        assert sum(len(r.token_ids) for r in responses) == 3
        assert responses[-1].final.finish_reason == "length"

    with Client(target, timeout=CALL_TIMEOUT) as client:
        assert client.health() == "SERVING"
        info = client.model_info()
        assert info.model_name == "tiny-llama" and info.mesh_preset == "cpu-tp4-pp2tp2"


def test_bad_request_gets_invalid_argument(target):
    with Client(target, timeout=CALL_TIMEOUT) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.complete([5, 999])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary" in err.value.details()


def test_client_cli_text_prompt_needs_a_tokenizer(target):
    """The CLI only sends text (no token-id flag); tiny-llama has no tokenizer, so: INVALID_ARGUMENT, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "jdisagg.client", "--target", target, "--json", "--max_tokens", "4", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("jdisagg.client: error: INVALID_ARGUMENT: "), proc.stderr
    assert "no tokenizer" in proc.stderr


def test_sigterm_drains_in_flight_requests(process, target, offline):
    """Runs last: it ends the module's server process."""
    prompt, max_tokens = [11, 12, 13, 14], 200
    with Client(target, timeout=CALL_TIMEOUT) as client:
        stream = client.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
        first = next(stream)
        assert first.token_ids and not first.HasField("final")

        process.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health still SERVING 10 s after SIGTERM"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:
            client.complete([5, 6], max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "draining", err.value.details()  # the stream below still runs

        rest = list(stream)
    tokens = list(first.token_ids) + [t for m in rest for t in m.token_ids]
    assert rest and rest[-1].final.finish_reason == "length"
    assert len(tokens) == rest[-1].final.completion_tokens == max_tokens
    assert process.proc.wait(30) == 0, process.stderr_tail()
    [want] = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert tokens == want.tokens
