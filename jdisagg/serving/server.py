"""The gRPC server: the ``jdisagg.v1.Generation`` service over an Engine.

Threads:
  * one worker per instance loops on its body in ``Engine.loops`` (``prefill_once`` for a
    prefill instance, ``decode_once`` for a decode or chunked one, prefill-first for a
    colocated one); each sleeps on ``Engine.wake`` when idle. A worker
    that raises ends every held request with an error, marks the server NOT_SERVING and
    sets ``failed`` (``jdisagg.serve`` then exits 1, for a supervisor to restart it), so no
    stream hangs.
  * gRPC handler threads turn requests into ``scheduler.Request``s, submit them, and stream
    from each request's event queue, detokenizing incrementally. A client that cancels or
    whose deadline passes cancels its request, which frees its queue slot, prefix KV and
    pages at the next scheduling step.

Health (``grpc.health.v1``) reports NOT_SERVING while warming up and while draining, and
``Generate`` answers UNAVAILABLE then.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent import futures

import grpc
from absl import logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jdisagg.engine import Engine
from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.scheduler import Request
from jdisagg.serving.metrics import Metrics
from jdisagg.text.tokenizer import IncrementalDetokenizer

SERVICE = "jdisagg.v1.Generation"
DEFAULT_MAX_TOKENS = 64


class _Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Server:
    """Serves an Engine over gRPC on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        max_queue: int = 1024,
        metrics: Metrics | None = None,
    ):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = metrics or Metrics()
        self.ready = False
        self.draining = False
        self._stop = threading.Event()
        self.failed = threading.Event()  # a worker died; the server only rejects from now on
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        # A stream holds a handler thread for its whole life, so there is one thread for every
        # request the server can hold (queued, buffered or decoding) plus a few for the small
        # RPCs; gRPC answers RESOURCE_EXHAUSTED beyond that instead of letting requests wait
        # unseen for a thread. (64 threads capped an H200 pair at ~64 concurrent streams.)
        streams = max_queue + sum(d.slots.max_batch for d in engine.decode)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(streams + 16, thread_name_prefix="grpc"), maximum_concurrent_rpcs=streams + 16
        )
        pb_grpc.add_GenerationServicer_to_server(_Servicer(self), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.workers = [threading.Thread(target=self._work, args=loop, daemon=True) for loop in engine.loops]

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Listens now (answering UNAVAILABLE until ``set_ready``) and starts the workers."""
        self.grpc.start()
        for w in self.workers:
            w.start()

    def set_ready(self) -> None:
        self.ready = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logging.info("serving %s on port %d", self.engine.model.card.name, self.port)

    def drain(self, timeout: float | None = None) -> None:
        """Stops taking requests, lets in-flight ones finish, then stops everything."""
        self.draining = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._inflight and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self.engine.wake:
            self.engine.wake.notify_all()
        self.grpc.stop(grace=1).wait()
        for w in self.workers:
            w.join(timeout=10)

    def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            self.health.set(name, status)

    def _work(self, name: str, once) -> None:
        try:
            while not self._stop.is_set():
                if not once():
                    with self.engine.wake:
                        self.engine.wake.wait(timeout=0.05)
                self._observe()
        except Exception as e:  # a dead worker must not leave streams hanging
            logging.exception("worker %s failed", name)
            self.ready = False
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.engine.fail_all(f"{name} failed: {e}")
            self.failed.set()

    def _observe(self) -> None:
        m, e = self.metrics, self.engine
        m.queue_depth.set(len(e.queue))
        m.prefilled.set(len(e.prefilled))
        for i, d in enumerate(e.decode):
            m.running.labels(str(i)).set(len(d.slots))
            m.pages_total.labels(str(i)).set(d.slots.allocator.capacity)
            m.pages_used.labels(str(i)).set(d.slots.allocator.capacity - d.slots.allocator.num_free)

    # ---- requests ------------------------------------------------------------------

    def request_from_proto(self, msg: pb.GenerateRequest) -> Request:
        """Validates a GenerateRequest; raises _Rejected with the status code to return."""
        e = self.engine
        kind = msg.WhichOneof("input")
        try:
            if kind is None:
                raise ValueError("the request has no input: set text, token_ids or chat")
            if kind == "text":
                prompt = e.encode(msg.text) if msg.text else []
            elif kind == "token_ids":
                prompt = list(msg.token_ids.ids)
            else:
                if e.tokenizer is None:
                    raise ValueError(f"model {e.model.card.name} has no tokenizer, so no chat template")
                messages = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
                if not messages:
                    raise ValueError("chat has no messages")
                prompt = e.tokenizer.encode_chat(messages)
            s = msg.sampling
            params = SamplingParams(
                logprobs=s.logprobs,
                max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p or 1.0,
                seed=s.seed if s.HasField("seed") else random.getrandbits(32),
                stop=tuple(s.stop),
                stop_token_ids=tuple(s.stop_token_ids),
                ignore_eos=s.ignore_eos,
            )
            if msg.slo.ttft_s < 0 or msg.slo.tpot_s < 0:
                raise ValueError("slo.ttft_s and slo.tpot_s must be >= 0")
            request = e.make_request(prompt, params)
        except ValueError as err:
            raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        with e.lock:
            waiting = len(e.queue) + len(e.prefilled)
        if waiting >= self.max_queue:
            raise _Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({waiting} requests waiting)")
        return request

    def generate(self, msg: pb.GenerateRequest, context: grpc.ServicerContext):
        if not self.ready or self.draining:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, "draining" if self.draining else "warming up")
        try:
            request = self.request_from_proto(msg)
        except _Rejected as r:
            self._reject(context, r.code, str(r))
        request.events = queue.SimpleQueue()
        with self._inflight_lock:
            self._inflight += 1
        try:
            context.add_callback(lambda: self.engine.cancel(request))
            self.engine.submit(request)
            yield from self._stream(request, msg, context)
        finally:
            with self._inflight_lock:
                self._inflight -= 1

    def _stream(self, request: Request, msg: pb.GenerateRequest, context):
        e = self.engine
        detok = IncrementalDetokenizer(e.tokenizer, request.prompt) if e.tokenizer else None
        text, sent, n_tokens = "", 0, 0
        stops = request.params.stop
        while True:
            try:
                tokens, finished = request.events.get(timeout=0.1)
            except queue.Empty:
                if not context.is_active():
                    e.cancel(request)
                    return
                continue
            while not finished and not request.events.empty():  # behind: send what is ready in one message
                more, finished = request.events.get_nowait()
                tokens = tokens + more
            shown = tokens
            if (
                finished
                and request.finish_reason == "stop"
                and tokens
                and (tokens[-1] in request.params.stop_token_ids or tokens[-1] in e.eos_ids)
            ):
                shown = tokens[:-1]  # a stop token ends the text but is not part of it
            if detok:
                text += "".join(detok.push(t) for t in shown) + (detok.flush() if finished else "")
            cut = len(text)
            for s in stops:
                if s in text:
                    cut = min(cut, text.index(s))
            delta, sent = text[sent:cut], max(sent, cut)
            logprobs = [_logprob(t, lp) for t, lp in zip(tokens, request.logprobs[n_tokens:], strict=False)]
            n_tokens += len(tokens)
            if not finished:
                if tokens:
                    yield pb.GenerateResponse(token_ids=tokens, text=delta, logprobs=logprobs)
                continue
            if request.error:
                context.abort(grpc.StatusCode.INTERNAL, request.error)
            if request.finish_reason == "cancelled":
                context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
            final = self._final(request, msg)
            yield pb.GenerateResponse(token_ids=tokens, text=delta, logprobs=logprobs, final=final)
            return

    def _final(self, r: Request, msg: pb.GenerateRequest) -> pb.FinalInfo:
        t = r.times
        first, done = t.get("first_token", r.arrival), t.get("finished", time.perf_counter())
        n = len(r.output)
        latency = pb.LatencyBreakdown(
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
        m = self.metrics
        m.finished.labels(r.finish_reason).inc()
        m.ttft.observe(latency.ttft_s)
        if n > 1:
            m.tpot.observe(latency.tpot_s)
        m.queue.observe(latency.queue_s)
        if r.transfer_bytes:
            m.transfer.observe(r.transfer_s)
            m.transfer_bytes.observe(r.transfer_bytes)
        slo = msg.slo
        attained = (not slo.ttft_s or latency.ttft_s <= slo.ttft_s) and (not slo.tpot_s or latency.tpot_s <= slo.tpot_s)
        return pb.FinalInfo(
            finish_reason=r.finish_reason,
            prompt_tokens=len(r.prompt),
            completion_tokens=n,
            latency=latency,
            request_id=msg.request_id,
            slo_attained=attained,
        )

    def _reject(self, context, code: grpc.StatusCode, message: str):
        self.metrics.errors.labels(code.name).inc()
        context.abort(code, message)

    def tokenize(self, msg: pb.TokenizeRequest, context):
        tok = self.engine.tokenizer
        if tok is None:
            self._reject(context, grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer")
        kind = msg.WhichOneof("input")
        if kind == "chat":
            ids = tok.encode_chat([{"role": m.role, "content": m.content} for m in msg.chat.messages])
        elif kind == "text":
            ids = tok.encode(msg.text, add_bos=None if msg.add_special_tokens else False)
        else:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "set text or chat")
        return pb.TokenizeResponse(token_ids=ids, tokens=[tok.decode([i]) for i in ids])

    def model_info(self, msg, context):
        e = self.engine
        preset = e.preset
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
                max_prompt_tokens=preset.max_seq_len - 1, max_tokens=preset.max_seq_len - 1, max_queue=self.max_queue
            ),
            mesh_toml=_read(preset.source),
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


class _Servicer(pb_grpc.GenerationServicer):
    def __init__(self, server: Server):
        self.server = server

    def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        yield from self.server.generate(request, context)

    def Tokenize(self, request, context):  # noqa: N802
        return self.server.tokenize(request, context)

    def ModelInfo(self, request, context):  # noqa: N802
        return self.server.model_info(request, context)
