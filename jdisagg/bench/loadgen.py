"""Load generation: send a sweep of workloads to a server and record what comes back.

``run_benchmark(target, config)`` talks gRPC to a jdisagg server at ``host:port``
(``GrpcTarget``) or the OpenAI HTTP API to any server at ``http://host:port``
(``openai_client.OpenAITarget``: jdisagg's HTTP API, vLLM, SGLang; the same requests, and
results with the same fields). It asks the server what it serves (vocabulary,
``max_seq_len``, devices), builds one sweep point per rate (the same requests and the same
arrival pattern scaled by 1/rate, see ``workloads``), and runs the points one after the
other, lowest rate first, on one channel or connection pool (with ``stop_below``, the
rates above a point whose attainment fell below it are skipped: past the first miss they
cannot change the goodput, and an overloaded point takes long to drain). Within a point a dispatcher sleeps until each
request's arrival time and starts one asyncio task per request; a task records the send
time, the arrival time of every token (a stream message may carry several tokens: they all
get that message's time), the FinalInfo's latency breakdown and finish reason, or the
error's status code. A point ends when all its requests have; the next starts on an idle
server. Over HTTP a token's time is its stream chunk's (see ``openai_client``). With
``warmup_s`` a point first sends arrivals for that long at the same rate and
counts only the requests that arrive after it, so the figures describe a loaded server
rather than one filling up from idle. The result is plain JSON data
(``stats.summarize_point`` per point, the goodput, and one record per request).

``local_server(model, mesh)`` runs a ``jdisagg.server.Server`` in this process on a free
port instead. Its threads share the interpreter with the client, so at high rates the
client's own work shows up in the measured latencies; a separate ``jdisagg.serve`` process
(``--target``) avoids that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import grpc
import grpc.aio
from tqdm.auto import tqdm

from jdisagg.bench import stats, workloads
from jdisagg.bench.stats import RequestResult, Slo
from jdisagg.bench.workloads import BenchRequest
from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.serving.client import AsyncClient


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to send and how to judge it; ``validate`` explains a bad combination."""

    workload: str
    rates: tuple[float, ...] = ()  # requests/s per sweep point; empty for a trace
    cv: float = 1.0  # arrival gaps' coefficient of variation (1: Poisson)
    num_requests: int = 0  # per point; or
    duration_s: float = 0.0  # per point: every arrival before this time
    warmup_s: float = 0.0  # per point: arrivals this long before the measured ones, not counted
    slo: Slo = Slo(ttft_s=1.0, tpot_s=0.1)
    target_attainment: float = 0.9
    gpus: int = 0  # 0: the devices of the server's instances
    seed: int = 0
    label: str = ""  # "": the server's mesh preset
    vocab_size: int = 0  # 0: the server's
    input_len: int = 512  # fixed
    output_len: int = 64  # fixed
    humaneval_path: str | None = None  # code
    trace: str | None = None  # trace
    trace_speed: float = 1.0  # trace
    wait_s: float = 600.0  # how long to wait for the server to report SERVING
    stop_below: float = 0.0  # skip the higher rates once a point's attainment is below this
    progress: bool = True

    def validate(self) -> None:
        if self.workload not in workloads.WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; expected one of {', '.join(workloads.WORKLOADS)}")
        if self.workload == "trace":
            if not self.trace:
                raise ValueError("--workload=trace needs --trace FILE")
            if self.rates:
                raise ValueError("a trace's timestamps set the arrivals: drop --rates (use --trace_speed)")
            if self.trace_speed <= 0:
                raise ValueError(f"--trace_speed must be > 0 (got {self.trace_speed})")
        else:
            if not self.rates:
                raise ValueError("give --rates, e.g. --rates 1,2,4,8")
            if any(r <= 0 for r in self.rates):
                raise ValueError(f"--rates must all be > 0 (got {list(self.rates)})")
            if bool(self.num_requests) == bool(self.duration_s):
                raise ValueError("give exactly one of --num_requests and --duration_s")
        if self.num_requests < 0 or self.duration_s < 0:
            raise ValueError("--num_requests and --duration_s must be >= 0")
        if self.warmup_s < 0:
            raise ValueError(f"--warmup_s must be >= 0 (got {self.warmup_s:g})")
        if self.warmup_s and (self.workload == "trace" or not self.duration_s):
            raise ValueError("--warmup_s goes with --duration_s and a rate sweep (not a trace or --num_requests)")
        if self.cv <= 0:
            raise ValueError(f"--cv must be > 0 (got {self.cv})")
        if self.slo.ttft_s <= 0 or self.slo.tpot_s <= 0:
            raise ValueError("--slo_ttft and --slo_tpot must be > 0")
        if not 0 < self.target_attainment <= 1:
            raise ValueError(f"--target_attainment must be in (0, 1] (got {self.target_attainment})")
        if not 0 <= self.stop_below <= self.target_attainment:
            # Above the target, stopping could skip the rate where attainment crosses it.
            raise ValueError(
                f"--stop_below must be in [0, --target_attainment={self.target_attainment:g}] (got {self.stop_below:g})"
            )
        if self.gpus < 0 or self.vocab_size < 0:
            raise ValueError("--gpus and --vocab_size must be >= 0")
        if self.workload == "fixed" and (self.input_len < 1 or self.output_len < 1):
            raise ValueError("--input_len and --output_len must be >= 1")


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What the benchmark needs to know of a server; 0 or "" where it does not say."""

    model: str
    mesh_preset: str
    vocab_size: int
    max_seq_len: int
    gpus: int  # distinct devices over its instances


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: requests and their send times (seconds from the point's start)."""

    rate: float
    requests: Sequence[BenchRequest]
    arrivals: Sequence[float]
    warmup_s: float = 0.0  # requests arriving earlier load the server but are not counted


# ---- sending --------------------------------------------------------------------------------


class GrpcTarget:
    """A jdisagg server's gRPC service at ``host:port``."""

    def __init__(self, target: str, *, api_key: str | None = None):
        self.target = target
        self.client = AsyncClient(target, api_key=api_key)

    async def close(self) -> None:
        await self.client.close()

    async def wait_until_serving(self, wait_s: float) -> ServerInfo:
        info = await wait_until_serving(self.client, wait_s)
        return ServerInfo(info.model_name, info.mesh_preset, info.vocab_size, info.max_seq_len, server_gpus(info))

    async def tokenize(self, text: str) -> list[int]:
        try:
            return list((await self.client.tokenize(text)).token_ids)
        except grpc.aio.AioRpcError as err:
            raise ValueError(f"cannot tokenize the trace's text prompts: {err.code().name}: {err.details()}") from None

    async def send(self, request: BenchRequest, t0: float, slo: Slo) -> RequestResult:
        return await send_one(self.client, request, t0, slo)


def connect(target: str, *, api_key: str | None = None, model: str | None = None):
    """The target for ``target``: ``http://`` or ``https://`` -> OpenAI HTTP API, else gRPC ``host:port``."""
    if target.startswith(("http://", "https://")):
        from jdisagg.bench.openai_client import OpenAITarget

        return OpenAITarget(target, api_key=api_key, model=model)
    if model is not None:
        raise ValueError("a gRPC target serves one model: --model goes with an http:// target or --mesh")
    return GrpcTarget(target, api_key=api_key)


async def send_one(client: AsyncClient, request: BenchRequest, t0: float, slo: Slo) -> RequestResult:
    """Sends one request and records every token's arrival (seconds since ``t0``, perf_counter)."""
    result = RequestResult(request.input_len, request.output_len, clipped=request.clipped)
    result.sent = time.perf_counter() - t0
    try:
        stream = client.generate(
            request.prompt, max_tokens=request.output_len, ignore_eos=True, slo_ttft=slo.ttft_s, slo_tpot=slo.tpot_s
        )
        async with stream:
            async for msg in stream:
                now = time.perf_counter() - t0
                result.token_times += [now] * len(msg.token_ids)
                if msg.HasField("final"):
                    result.finish_reason = msg.final.finish_reason
                    lat = msg.final.latency
                    result.server = {k: float(getattr(lat, k)) for k in stats.SERVER_FIELDS}
        if not result.finish_reason:
            result.error, result.error_details = "NO_FINAL", "the stream ended without a final message"
    except grpc.aio.AioRpcError as e:
        result.error, result.error_details = e.code().name, e.details() or ""
    result.end = time.perf_counter() - t0
    return result


async def run_point(target, point: Point, slo: Slo, progress: bool = True) -> list[RequestResult]:
    """Sends each request at its arrival time; returns the results in request order."""
    bar = tqdm(total=len(point.requests), desc=f"rate {point.rate:g}/s", disable=not progress, unit="req")
    t0 = time.perf_counter()
    tasks = []
    with bar:
        for request, at in zip(point.requests, point.arrivals, strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(target.send(request, t0, slo))
            task.add_done_callback(lambda _: bar.update())
            tasks.append(task)
        return list(await asyncio.gather(*tasks))


def measured(point: Point, results: Sequence[RequestResult]) -> list[RequestResult]:
    """The results of the requests that arrived after the point's warm-up."""
    return [r for r, at in zip(results, point.arrivals, strict=True) if at >= point.warmup_s]


async def wait_until_serving(client: AsyncClient, wait_s: float) -> pb.ModelInfoResponse:
    """The server's ModelInfo once its health reports SERVING (it may still be compiling)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if await client.health() == "SERVING":
                return await client.model_info()
            last = "NOT_SERVING (warming up?)"
        except grpc.aio.AioRpcError as e:
            last = f"{e.code().name}: {e.details()}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {client.target} is not serving after {wait_s:g}s: {last}")
        await asyncio.sleep(0.5)


def server_gpus(info: pb.ModelInfoResponse) -> int:
    """Distinct devices over the server's instances."""
    return len({d for inst in info.instances for d in inst.devices})


# ---- the sweep ------------------------------------------------------------------------------


async def plan_points(target, config: BenchConfig, vocab_size: int, max_seq_len: int) -> list[Point]:
    """The sweep points: one per rate, or one for a trace (whose text prompts ``target`` tokenizes)."""
    c = config
    if c.workload == "trace":
        entries = workloads.read_trace(c.trace)
        if c.duration_s:
            entries = [e for e in entries if e.timestamp - entries[0].timestamp < c.duration_s * c.trace_speed]
        if c.num_requests:
            entries = entries[: c.num_requests]
        ids = []
        for e in entries:  # the server's tokenizer counts a text prompt's tokens
            ids.append(None if e.prompt is None else await target.tokenize(e.prompt))
        requests = workloads.trace_requests(entries, ids, c.seed, vocab_size, max_seq_len)
        arrivals = workloads.trace_arrivals(entries, c.trace_speed)
        span = float(arrivals[-1])
        return [Point((len(arrivals) - 1) / span if span > 0 else 0.0, requests, arrivals.tolist())]
    span = c.duration_s and c.warmup_s + c.duration_s
    schedules = [
        workloads.arrival_times(r, c.cv, c.seed, num_requests=c.num_requests, duration_s=span) for r in c.rates
    ]
    n = max(len(s) for s in schedules)
    opts = dict(input_len=c.input_len, output_len=c.output_len, humaneval_path=c.humaneval_path)
    requests = workloads.make_requests(
        workloads.lengths_for(c.workload, n, c.seed, **opts), c.seed, vocab_size, max_seq_len
    )
    return [Point(r, requests[: len(s)], s.tolist(), c.warmup_s) for r, s in zip(c.rates, schedules, strict=True)]


async def run_benchmark(
    target: str, config: BenchConfig, *, api_key: str | None = None, model: str | None = None
) -> dict:
    """Runs the sweep against ``target`` (``host:port`` for gRPC, ``http://host:port`` for the
    OpenAI API; ``model`` picks one of an HTTP server's models) and returns the result as plain JSON data."""
    config.validate()
    server = connect(target, api_key=api_key, model=model)
    try:
        info = await server.wait_until_serving(config.wait_s)
        vocab_size = config.vocab_size or info.vocab_size
        if not vocab_size:
            raise ValueError(f"the server at {target} does not report its vocabulary size: give --vocab_size")
        max_seq_len = info.max_seq_len or UNLIMITED
        gpus = config.gpus or info.gpus or 1
        points = sorted(await plan_points(server, config, vocab_size, max_seq_len), key=lambda p: p.rate)
        summaries, skipped = [], []
        for point in points:
            if summaries and summaries[-1]["attainment"] < config.stop_below:
                skipped.append(point.rate)
                continue
            results = await run_point(server, point, config.slo, config.progress)
            counted = measured(point, results)
            summary = stats.summarize_point(point.rate, counted, config.slo, gpus)
            summary["warmup_requests"] = len(results) - len(counted)
            summary["requests"] = [stats.request_record(r, config.slo) for r in counted]
            summaries.append(summary)
    finally:
        await server.close()
    good = stats.goodput([s["rate"] for s in summaries], [s["attainment"] for s in summaries], config.target_attainment)
    options = dict(input_len=config.input_len, output_len=config.output_len) if config.workload == "fixed" else {}
    if config.workload == "trace":
        options = dict(trace=config.trace, trace_speed=config.trace_speed)
    return {
        "label": config.label or info.mesh_preset or info.model,
        "workload": config.workload,
        "workload_options": options,
        "cv": config.cv,
        "seed": config.seed,
        "duration_s": config.duration_s,
        "warmup_s": config.warmup_s,
        "slo": dataclasses.asdict(config.slo),
        "target_attainment": config.target_attainment,
        "gpus": gpus,
        "server": {
            "target": target,
            "api": "openai" if target.startswith(("http://", "https://")) else "grpc",
            "model": info.model,
            "mesh_preset": info.mesh_preset,
            "vocab_size": vocab_size,
            "max_seq_len": info.max_seq_len,
        },
        "goodput": good.record(gpus),
        "points": summaries,
        "skipped_rates": skipped,
    }


UNLIMITED = 2**31 - 1  # max_seq_len of a server that does not report one: nothing is clipped


@contextlib.contextmanager
def local_server(model: str, mesh: str, *, warm_up: bool = True, progress: bool = True) -> Iterator[str]:
    """A ``jdisagg.serving.server.Server`` for ``model`` on ``mesh`` in this process, on a free port;
    yields its target ("127.0.0.1:PORT") once every program is compiled, and stops it after."""
    from jdisagg.engine import Engine
    from jdisagg.serving.server import Server

    engine = Engine(model, mesh, warm_up=warm_up, progress=progress)
    server = Server(engine, port=0)
    server.start()
    server.set_ready()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop()
