"""The gRPC server: the ``jdisagg.v1.Generation`` service over an Engine's instances, and
(with ``http_port``) the OpenAI-compatible HTTP API of ``serving.http`` on the same event loop.

Threads and the event loop:
  * one worker thread per instance runs its loop body (``runtime.workers``) and sleeps while
    the scheduler has nothing for it (it wakes on the scheduler's ``on_change``). A worker
    that raises ends every held request with an error, marks the server NOT_SERVING and sets
    ``failed`` (``jdisagg.serve`` then exits 1, for a supervisor to restart it), so no stream
    hangs.
  * one asyncio event loop (its own thread) runs the ``grpc.aio`` server: no thread per
    stream, so it holds as many open streams as ``max_queue`` and the decode slots allow.
    A call's handler parses the request bytes itself (a malformed message is
    INVALID_ARGUMENT, not INTERNAL), checks and tokenizes it in a small thread pool (off the
    loop; ``serving.intake`` refuses oversized text before tokenizing), submits it, and
    streams what its request's listener hands over from the workers. A client that cancels,
    or whose deadline passes, cancels its request: its queue slot, prefix KV and pages are
    freed at once. Both protocols go through ``admit`` and ``run``.

``access`` (``serving.access``) adds TLS and an API key to both protocols.

Health (``grpc.health.v1``) reports NOT_SERVING while warming up, while draining and after
a worker failed, and ``Generate`` answers UNAVAILABLE then. Server reflection is on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import grpc.aio
from absl import logging
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jdisagg.engine import Engine
from jdisagg.plan.trace import TraceRecorder
from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.runtime import workers
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Output, Request
from jdisagg.serving import intake
from jdisagg.serving.access import Access
from jdisagg.serving.metrics import Metrics

SERVICE = "jdisagg.v1.Generation"
DEFAULT_MAX_TOKENS = 64
MAX_MESSAGE_BYTES = 8 * 2**20  # gRPC's limit on one request message (and HTTP's on one request body)
T = TypeVar("T")


# A client whose deadline passes cancels its call before the server's copy of that deadline
# (started when the call arrived) passes, by the time the call took to arrive: a loaded
# machine counted such deadlines as cancellations. A cancel this close to the deadline counts
# as the deadline.
DEADLINE_SLACK_S = 1.0


class Rejected(Exception):
    """A call refused with a status code (and a message for the client)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Server:
    """Serves an Engine over gRPC on ``host:port`` (port 0 picks a free one), and over HTTP on
    ``host:http_port`` if that is not None (0 picks a free one; ``self.http.port`` once listening)."""

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        max_queue: int = 1024,
        metrics: Metrics | None = None,
        http_port: int | None = None,
        access: Access | None = None,
        record_trace: str | None = None,
    ):
        self.engine, self.max_queue, self.access = engine, max_queue, access or Access()
        # The workload as served (arrival, input and output lengths; no text), for replanning.
        self.trace = TraceRecorder(record_trace, clock=engine.sched.clock) if record_trace else None
        self.metrics = metrics or Metrics()
        self.metrics.watch(engine.sched.load, len(engine.decode))
        self.ready = False
        self.draining = False
        self.failed = threading.Event()  # a worker died; the server only rejects from now on
        self._failure: str | None = None  # why, set before anything held is failed
        self.inflight = 0  # accepted calls not yet ended (touched on the event loop only)
        self._stop = threading.Event()
        self._changes = workers.Wakeup()
        engine.sched.on_change = self._changes.notify
        self._intake_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="intake")
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        self.grpc: grpc.aio.Server = self._run(self._build(host, port))
        self.http = None
        if http_port is not None:
            from jdisagg.serving.http import HttpApi  # imports aiohttp, needed only here

            self.http = HttpApi(self, host, http_port)
        self.workers = [
            threading.Thread(target=self._work, args=loop, name=loop[0], daemon=True) for loop in engine.loops
        ]

    def _run(self, coroutine):
        """Runs ``coroutine`` on the server's event loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _build(self, host: str, port: int) -> grpc.aio.Server:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        refused = self.metrics.errors.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc
        server = grpc.aio.server(options=options, interceptors=self.access.grpc_interceptors(refused) or None)
        raw = dict(request_deserializer=None)  # handlers parse the bytes themselves
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self._generate, response_serializer=pb.GenerateResponse.SerializeToString, **raw
            ),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self._tokenize, response_serializer=pb.TokenizeResponse.SerializeToString, **raw
            ),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self._model_info, response_serializer=pb.ModelInfoResponse.SerializeToString, **raw
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        credentials = self.access.grpc_credentials()
        address = f"{host}:{port}"
        self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        return server

    # ---- lifecycle -----------------------------------------------------------------------

    def listen(self) -> None:
        """Accepts calls now (UNAVAILABLE until ``set_ready``); the workers are not started."""
        self._run(self.grpc.start())
        if self.http is not None:
            self._run(self.http.start())

    def start(self) -> None:
        """Listens and starts the workers."""
        self.listen()
        for w in self.workers:
            w.start()

    def set_ready(self) -> None:
        self.ready = True
        self._run(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        logging.info("serving %s on port %d", self.engine.model.card.name, self.port)

    def drain(self, timeout: float | None = None) -> None:
        """Stops taking requests, lets in-flight ones finish, then stops everything."""
        self.draining = True
        self._run(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.inflight and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._changes.notify()
        if self.http is not None:
            self._run(self.http.stop())
        self._run(self.grpc.stop(grace=1))
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)
        self._intake_pool.shutdown(wait=False, cancel_futures=True)
        if self.trace is not None:
            self.trace.close()

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    def _work(self, name: str, once) -> None:
        try:
            while not self._stop.is_set():
                seen = self._changes.count()
                if not once():
                    self._changes.wait(seen, timeout=0.5)
        except Exception as e:  # a dead worker must not leave streams hanging
            # First the reason, then everything held: a request submitted after fail_all looked
            # sees the reason in run() and fails itself (its batch's clients may have their
            # errors already, and call again, before this line runs).
            self._failure, self.ready = f"{name} failed: {e}", False
            logging.exception("worker %s failed", name)
            asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), self.loop)
            self.engine.sched.fail_all(self._failure)
            self.failed.set()

    # ---- requests ------------------------------------------------------------------------

    def request_from_proto(self, msg: pb.GenerateRequest) -> Request:
        """Checks and tokenizes a GenerateRequest; ValueError says what is wrong."""
        take = self.engine.intake
        kind = msg.WhichOneof("input")
        if kind is None:
            raise ValueError("the request has no input: set text, token_ids or chat")
        intake.check_request_id(msg.request_id)
        intake.check_slo(msg.slo.ttft_s, msg.slo.tpot_s)
        s = msg.sampling
        params = SamplingParams(
            logprobs=s.logprobs,
            max_tokens=s.max_tokens or min(DEFAULT_MAX_TOKENS, take.limits.max_tokens),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p or 1.0,
            seed=s.seed if s.HasField("seed") else random.getrandbits(32),
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
        )
        if kind == "text":
            prompt = take.encode_text(msg.text) if msg.text else []
        elif kind == "token_ids":
            prompt = list(msg.token_ids.ids)
        else:
            prompt = take.encode_chat([{"role": m.role, "content": m.content} for m in msg.chat.messages])
        return take.request(prompt, params)

    async def _parse(self, message_type, raw: bytes, context):
        try:
            return message_type.FromString(raw)
        except DecodeError as err:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed {message_type.__name__}: {err}")

    async def _abort(self, context, code: grpc.StatusCode, message: str):
        self.metrics.errors.labels(code.name).inc()
        await context.abort(code, message)

    # ---- serving one request, for any protocol (gRPC here, HTTP in serving.http) ----------

    async def admit(self, build: Callable[[], T]) -> T:
        """What ``build()`` returns (a Request, or a protocol's call holding one), if the server
        takes it; ``build`` runs in the intake pool (it may parse and tokenize). Raises
        ``Rejected`` (UNAVAILABLE, INVALID_ARGUMENT for a ValueError, RESOURCE_EXHAUSTED); any
        other exception from ``build`` goes to the caller as it is."""
        if not self.ready or self.draining:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "draining" if self.draining else "warming up")
        try:
            request = await self.loop.run_in_executor(self._intake_pool, build)
        except ValueError as err:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        load = self.engine.sched.load()
        waiting = load.queued + sum(load.prefilled)
        if waiting >= self.max_queue:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({waiting} requests waiting)")
        return request

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """``fn()`` run in the intake pool (for parsing and tokenizing, which must not stall the loop)."""
        return await self.loop.run_in_executor(self._intake_pool, fn)

    async def run(self, request: Request):
        """Submits ``request`` and yields its ``Output``s (merged into one when the consumer is
        behind); the last has ``finished``. A consumer that stops early (the client went away)
        cancels the request. Raises ``Rejected`` (INTERNAL, or the request's ``error_code``;
        CANCELLED) for a request that ended without finishing."""
        outputs: asyncio.Queue[Output] = asyncio.Queue()
        request.listener = lambda out: self.loop.call_soon_threadsafe(outputs.put_nowait, out)
        self.inflight += 1
        self.engine.submit(request)
        if self._failure is not None:  # a worker died while this request was admitted: no one would run it
            self.engine.sched.fail([request], self._failure)
        try:
            while True:
                out = await outputs.get()
                while not out.finished and not outputs.empty():
                    more = outputs.get_nowait()
                    out = Output(
                        out.tokens + more.tokens, out.text + more.text, out.logprobs + more.logprobs, more.finished
                    )
                if out.finished and request.error:
                    self.metrics.finished.labels("error").inc()
                    code = grpc.StatusCode[request.error_code] if request.error_code else grpc.StatusCode.INTERNAL
                    raise Rejected(code, request.error)
                if out.finished and request.finish_reason == "cancelled":
                    self.metrics.finished.labels("cancelled").inc()
                    raise Rejected(grpc.StatusCode.CANCELLED, "the request was cancelled")
                if out.finished:
                    self._count_finished(request)
                yield out
                if out.finished:
                    return
        finally:
            self.inflight -= 1
            if not request.finished:  # the consumer stopped early
                self.engine.cancel(request)

    def client_left(self, deadline: bool) -> None:
        """Counts a request whose client cancelled it or whose deadline passed."""
        self.metrics.finished.labels("deadline" if deadline else "cancelled").inc()
        self.metrics.errors.labels("DEADLINE_EXCEEDED" if deadline else "CANCELLED").inc()

    def _count_finished(self, r: Request) -> None:
        m, lat = self.metrics, latency(r)
        m.finished.labels(r.finish_reason).inc()
        m.ttft.observe(lat.ttft_s)
        if len(r.output) > 1:
            m.tpot.observe(lat.tpot_s)
        m.queue.observe(lat.queue_s)
        if r.transfer_bytes:
            m.transfer.observe(r.transfer_s)
            m.transfer_bytes.observe(r.transfer_bytes)
        if self.trace is not None:
            self.trace.record(r)

    # ---- gRPC ----------------------------------------------------------------------------

    async def _generate(self, raw: bytes, context):
        msg = await self._parse(pb.GenerateRequest, raw, context)
        try:
            request = await self.admit(lambda: self.request_from_proto(msg))
            async with contextlib.aclosing(self.run(request)) as outputs:  # closed (request freed) however we leave
                async for out in outputs:
                    logprobs = [_logprob(t, lp) for t, lp in zip(out.tokens, out.logprobs, strict=False)]
                    final = _final(request, msg) if out.finished else None
                    if out.tokens or out.text or final:
                        yield pb.GenerateResponse(token_ids=out.tokens, text=out.text, logprobs=logprobs, final=final)
        except Rejected as r:
            await self._abort(context, r.code, str(r))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or its deadline passed
            # (CancelledError while waiting for output, GeneratorExit while suspended at a yield)
            remaining = context.time_remaining()
            self.client_left(deadline=remaining is not None and remaining <= DEADLINE_SLACK_S)
            raise

    def tokenize(self, msg: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """The ids Generate would see for the same input; ValueError says what is wrong."""
        take, tok = self.engine.intake, self.engine.tokenizer
        kind = msg.WhichOneof("input")
        if kind == "chat":
            ids = take.encode_chat([{"role": m.role, "content": m.content} for m in msg.chat.messages])
        elif kind == "text":
            ids = take.encode_text(msg.text, add_bos=None if msg.add_special_tokens else False)
        else:
            raise ValueError("set text or chat")
        return pb.TokenizeResponse(token_ids=ids, tokens=[tok.decode([i]) for i in ids])

    async def _tokenize(self, raw: bytes, context):
        msg = await self._parse(pb.TokenizeRequest, raw, context)
        if self.engine.tokenizer is None:
            await self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer")
        try:
            return await self.loop.run_in_executor(self._intake_pool, self.tokenize, msg)
        except ValueError as err:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))

    async def _model_info(self, raw: bytes, context):
        await self._parse(pb.ModelInfoRequest, raw, context)
        return self.model_info()

    def model_info(self) -> pb.ModelInfoResponse:
        e = self.engine
        preset, limits = e.preset, e.intake.limits
        pools = iter(d.runner.n_pages for d in e.decode)  # the pool sizes in use (a preset may leave them out)
        instances = [
            pb.Instance(
                role=s.role,
                devices=list(s.devices),
                pp=s.pp,
                tp=s.tp,
                max_batch=s.max_batch,
                pages=next(pools) if s.runs_decode else 0,
                page_size=preset.page_size,
            )
            for s in preset.instances
        ]
        return pb.ModelInfoResponse(
            model_name=e.model.card.name,
            architecture=e.cfg.arch,
            vocab_size=e.cfg.vocab_size,
            max_seq_len=preset.max_seq_len,
            dtype=e.cfg.dtype,
            parameters=e.cfg.param_count(),
            mesh_preset=preset.name,
            instances=instances,
            limits=pb.Limits(
                max_prompt_tokens=limits.max_prompt_tokens,
                max_tokens=limits.max_tokens,
                max_queue=self.max_queue,
                max_prompt_bytes=limits.max_prompt_bytes,
            ),
            card_toml=e.model.card.to_toml(),
            mesh_toml=_read(preset.source),
        )


def latency(r: Request) -> pb.LatencyBreakdown:
    """Where a finished request's time went (server clock)."""
    t = r.times
    first, done = t.get("first_token", r.arrival), t.get("finished", time.perf_counter())
    n = len(r.output)
    return pb.LatencyBreakdown(
        queue_s=t.get("prefill_start", r.arrival) - r.arrival,
        prefill_s=t.get("prefill_end", first) - t.get("prefill_start", r.arrival),
        transfer_s=r.transfer_s,
        transfer_bytes=r.transfer_bytes,
        decode_queue_s=max(0.0, t.get("admitted", t.get("prefill_end", first)) - t.get("prefill_end", first)),
        ttft_s=first - r.arrival,
        tpot_s=(done - first) / (n - 1) if n > 1 else 0.0,
        e2e_s=done - r.arrival,
        preemptions=r.preemptions,
    )


def _final(r: Request, msg: pb.GenerateRequest) -> pb.FinalInfo:
    lat, slo = latency(r), msg.slo
    attained = (not slo.ttft_s or lat.ttft_s <= slo.ttft_s) and (not slo.tpot_s or lat.tpot_s <= slo.tpot_s)
    return pb.FinalInfo(
        finish_reason=r.finish_reason,
        prompt_tokens=len(r.prompt),
        completion_tokens=len(r.output),
        latency=lat,
        request_id=msg.request_id,
        slo_attained=attained,
    )


def _logprob(token: int, lp) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=i, logprob=v) for i, v in lp.top]
    return pb.TokenLogprob(token_id=token, logprob=lp.logprob, top=top)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
