"""The router: the public API in front of prefill and decode instances that run in processes
of their own (``serving.instance``), on one host or many.

    python -m jdisagg.serve --role router --mesh cpu-2p2d --model tiny-llama --port 50051 --control_port 50052

It is a ``serving.server.Server`` (``jdisagg.v1`` over gRPC with health and reflection, and
HTTP with ``--http_port``) whose engine is a ``Cluster``: instead of runners in this process,
the instance processes that joined it (``Router.Join`` on the control port, see
``proto/internal.proto``). Everything runs on the server's one event loop: no thread per
stream and no locks; each request is one asyncio task (``Cluster._drive``).

A request's path (``Cluster._attempt``):
  1. the prefill instance with the least work (``sched.router.pick_prefill``) gets a
     Prefill call; it streams the first token, then a handle of the prefix it now holds
     under a lease;
  2. the decode instance with the fewest requests that can hold it (``pick_decode``) gets a
     Decode call with the handle; when it has room it pulls the KV straight from the prefill
     process (``transfer.remote``), says ``pulled`` (the router then ends the Prefill call,
     which frees the lease), and streams tokens;
  3. the router appends every token as the scheduling core does (``sched.request.append_token``:
     stop tokens, lengths, stop strings on the text it holds) and ends the calls when the
     request stops. A client that leaves cancels the task and with it both calls, which frees
     the prefix, the slot and the pages at once.

Faults, bounded: each instance streams a load report every ``heartbeat_s`` (``Watch``); one
that is silent for ``dead_after_s`` or whose connection fails is dropped and its calls are
cancelled. A request whose attempt failed that way (a prefill or decode process died, a
transfer failed or timed out, a lease expired) is recomputed from its prompt and the tokens
it already has on whatever instances remain, as preemption does (sampling depends only on
the seed and the position, so the tokens do not change); after ``max_retries`` such
failures, or when no prefill/decode pair remains, it ends with UNAVAILABLE. A preempted
request is re-prefilled without counting as a failure. Health is NOT_SERVING exactly while
no prefill/decode pair is serving; instances join and leave at any time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import grpc.aio
import prometheus_client as prom
from absl import logging
from grpc_health.v1 import health_pb2

from jdisagg.preset import MeshPreset
from jdisagg.proto import internal_pb2 as ipb
from jdisagg.proto import internal_pb2_grpc as ipb_grpc
from jdisagg.sched import router
from jdisagg.sched.request import Request, State, append_token, emit
from jdisagg.sched.scheduler import Load
from jdisagg.serving import wire
from jdisagg.serving.intake import Intake

_SERVICE = "jdisagg.v1.Generation"


@dataclasses.dataclass(eq=False)
class Member:
    """An instance process that joined, as the router sees it."""

    name: str
    info: ipb.InstanceInfo
    channel: grpc.aio.Channel
    stub: ipb_grpc.InstanceStub
    report: ipb.LoadReport | None = None
    alive: bool = False  # reported within dead_after_s, and no call to it failed since
    prepared: bool = False  # the prefill side's cuts into the decode layouts are compiled
    left: bool = False  # it said Leave (draining): takes nothing new
    attempts: set = dataclasses.field(default_factory=set)  # the _Attempts with a call to it
    waiting_tokens: int = 0  # prefill: prompt tokens sent, not yet prefilled
    requests: int = 0  # decode: requests sent, not ended
    watcher: asyncio.Task | None = None

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def serving(self) -> bool:
        draining = self.left or (self.report is not None and self.report.draining)
        return self.alive and self.prepared and not draining


class _Attempt:
    """The calls of one try at a request; ``abort`` ends them (their instance was lost)."""

    def __init__(self):
        self.calls: list = []
        self.aborted: str | None = None

    def abort(self, why: str) -> None:
        if self.aborted is None:
            self.aborted = why
            for call in self.calls:
                call.cancel()


@dataclasses.dataclass
class _Pool:  # what ModelInfo reads of a decode instance (``Engine.decode[i].runner.n_pages``)
    n_pages: int

    @property
    def runner(self):
        return self


class Cluster:
    """The engine a router's ``Server`` serves: instance processes instead of local runners.

    Provides what ``Server`` uses of an ``Engine`` (``submit``, ``cancel``, ``sched.load``,
    ``intake``, the model, the preset); ``attach`` then starts the control service on the
    server's event loop.
    """

    def __init__(
        self,
        loaded,
        preset: MeshPreset,
        *,
        heartbeat_s: float = 0.5,
        dead_after_s: float = 3.0,
        max_retries: int = 3,
    ):
        self.model, self.cfg, self.tokenizer, self.preset = loaded, loaded.cfg, loaded.tokenizer, preset
        self.max_seq_len = preset.max_seq_len
        self.eos_ids = tuple(self.tokenizer.eos_ids) if self.tokenizer else self.cfg.eos_ids
        name = loaded.card.name
        self.intake = Intake(
            self.tokenizer, vocab_size=self.cfg.vocab_size, max_seq_len=self.max_seq_len, model_name=name
        )
        self.heartbeat_s, self.dead_after_s, self.max_retries = heartbeat_s, dead_after_s, max_retries
        self.sched = self  # Server reads ``engine.sched.load()`` and sets ``engine.sched.on_change``
        self.on_change = None
        self.clock = time.perf_counter  # what request times are on (a trace recorder reads it)
        self.loops: list = []  # no workers in this process
        self.decode = [_Pool(s.pages) for s in preset.decode]
        self.members: dict[str, Member] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._queued = 0  # requests sent to a prefill instance and not prefilled yet
        self._serving: bool | None = None
        self.server = None
        self.control = None

    # ---- set-up --------------------------------------------------------------------------

    def attach(self, server, host: str, port: int) -> int:
        """Serves the control plane (Join, Leave) on ``host:port`` on ``server``'s event loop;
        returns the port."""
        self.server = server
        r = server.metrics.registry
        self._instances = prom.Gauge("jdisagg_router_instances", "Instances serving", ["role"], registry=r)
        self._retries = prom.Counter("jdisagg_router_retries", "Requests recomputed after a failure", registry=r)
        self._preempted = prom.Counter("jdisagg_router_preemptions", "Requests preempted by decode", registry=r)
        for role in ("prefill", "decode"):
            self._instances.labels(role).set_function(lambda role=role: self._count(role))
        return asyncio.run_coroutine_threadsafe(self._listen(host, port), server.loop).result()

    async def _listen(self, host: str, port: int) -> int:
        self.control = grpc.aio.server(options=wire.SERVER_OPTIONS)
        ipb_grpc.add_RouterServicer_to_server(_RouterService(self), self.control)
        bound = self.control.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await self.control.start()
        await self._update_health(force=True)
        return bound

    def _count(self, role: str) -> int:
        return sum(m.role == role and m.serving for m in list(self.members.values()))

    # ---- membership ----------------------------------------------------------------------

    def join(self, info: ipb.InstanceInfo) -> str:
        name = f"{info.role}[{info.index}]@{info.control}"
        old = self.members.get(name)
        if old is not None:
            self._lost(old, "joined again")
        channel = grpc.aio.insecure_channel(info.control, options=wire.CONTROL_OPTIONS)
        m = Member(name, info, channel, ipb_grpc.InstanceStub(channel))
        self.members[name] = m
        m.watcher = asyncio.get_running_loop().create_task(self._watch(m))
        logging.info("%s joined (%s, %d pages)", name, info.mesh, info.pages)
        return name

    def leave(self, control: str) -> None:
        for m in list(self.members.values()):
            if m.info.control == control:
                m.left = True
                logging.info("%s is leaving (no new requests)", m.name)
        asyncio.get_running_loop().create_task(self._update_health())

    async def _watch(self, m: Member) -> None:
        """Reads ``m``'s load reports; silence for ``dead_after_s`` or a broken stream drops it."""
        call = m.stub.Watch(ipb.WatchRequest(interval_s=self.heartbeat_s))
        stream = call.__aiter__()
        try:
            while True:
                m.report = await asyncio.wait_for(stream.__anext__(), self.dead_after_s)
                if not m.alive:
                    m.alive = True
                    if not m.prepared:
                        asyncio.get_running_loop().create_task(self._prepare(m))
                    await self._update_health()
        except asyncio.TimeoutError:
            why = f"no load report for {self.dead_after_s:g} s"
        except StopAsyncIteration:
            why = "its reports ended"
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name} {e.details()}"
        except asyncio.CancelledError:
            call.cancel()
            raise
        self._lost(m, why)

    async def _prepare(self, m: Member) -> None:
        """Has the prefill instances compile their cuts into the decode instances' layouts: a
        new prefill instance into every decode instance's, a new decode instance's into every
        prefill instance (before it serves: a first cut compiled while a pull waits could
        outlast the pull's timeout)."""
        if m.role == "prefill":
            pairs = [(m, d) for d in list(self.members.values()) if d.role == "decode"]
        else:
            pairs = [(p, m) for p in list(self.members.values()) if p.role == "prefill" and p.alive]
        for p, d in pairs:
            try:
                await p.stub.Prepare(ipb.PrepareRequest(layouts=d.info.layouts), timeout=600)
            except grpc.aio.AioRpcError as e:
                logging.warning("%s could not prepare for %s: %s", p.name, d.name, e.code().name)
        m.prepared = True
        logging.info("%s serving", m.name)
        await self._update_health()

    def _lost(self, m: Member, why: str) -> None:
        """Drops ``m``: its calls are cancelled and their requests recomputed elsewhere."""
        if self.members.get(m.name) is m:
            del self.members[m.name]
        was = m.alive
        m.alive = False
        logging.warning("%s lost (%s); %d request(s) affected", m.name, why, len(m.attempts))
        for attempt in list(m.attempts):
            attempt.abort(f"{m.name} lost: {why}")
        if m.watcher is not None and m.watcher is not asyncio.current_task():
            m.watcher.cancel()
        asyncio.get_running_loop().create_task(m.channel.close())
        if was or self._serving:
            asyncio.get_running_loop().create_task(self._update_health())

    async def _update_health(self, force: bool = False) -> None:
        """Health SERVING while a prefill and a decode instance are serving (and the server is
        not draining); ready from the first time that holds."""
        serving = self._count("prefill") > 0 and self._count("decode") > 0
        if self.server.draining or (serving == self._serving and not force):
            return
        self._serving = serving
        if serving and not self.server.ready:
            self.server.ready = True
            logging.info("serving %s: a prefill/decode pair is up", self.model.card.name)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", _SERVICE):
            await self.server.health.set(name, status)

    # ---- the engine, as Server sees it ---------------------------------------------------

    def load(self) -> Load:
        members = list(self.members.values())

        def per(role: str, n: int, field: str) -> list[int]:
            out = [0] * n
            for m in members:
                if m.role == role and m.report is not None and 0 <= m.info.index < n:
                    out[m.info.index] = getattr(m.report, field)
            return out

        n_prefill, n_decode = len(self.preset.prefill), len(self.preset.decode)
        return Load(
            queued=self._queued,
            prefilled=per("prefill", n_prefill, "held"),
            held_tokens=per("prefill", n_prefill, "held_tokens"),
            running=per("decode", n_decode, "running"),
            pages_used=per("decode", n_decode, "pages_used"),
            pages_total=per("decode", n_decode, "pages_total"),
        )

    def submit(self, r: Request) -> None:
        """Routes ``r`` (on the server's event loop)."""
        if r.arrival is None:
            r.arrival = time.perf_counter()
        self._tasks[r.id] = asyncio.get_running_loop().create_task(self._drive(r))

    def cancel(self, r: Request) -> None:
        """Ends ``r`` with "cancelled"; its calls end, which frees its prefix, slot and pages."""
        if r.finished:
            return
        r.cancelled = True
        self._finish(r, "cancelled")
        task = self._tasks.get(r.id)
        if task is not None:
            task.cancel()

    # ---- a request's path ----------------------------------------------------------------

    async def _drive(self, r: Request) -> None:
        failures = 0
        try:
            while not r.finished:
                why = await self._attempt(r)
                if why is None or r.finished:
                    return
                if why == "preempted":
                    r.preemptions += 1
                    self._preempted.inc()
                    continue
                failures += 1
                if failures > self.max_retries:
                    self._fail(r, "UNAVAILABLE", f"failed {failures} times; the last: {why}")
                    return
                self._retries.inc()
                logging.info("request %d: recomputing (%s)", r.id, why)
                await asyncio.sleep(0.05 * failures)
        except asyncio.CancelledError:
            if not r.finished:  # the server is stopping
                self._fail(r, "UNAVAILABLE", "the router is stopping")
        except Exception as e:  # a bug: end the request rather than leave its stream hanging
            logging.exception("request %d failed in the router", r.id)
            self._fail(r, "INTERNAL", f"router: {e}")
        finally:
            self._tasks.pop(r.id, None)

    async def _attempt(self, r: Request) -> str | None:
        """One try at prefilling and decoding ``r``: None once it ended (finished, or failed for
        good), else why it must be tried again."""
        p = self._pick_prefill()
        if p is None or self._count("decode") == 0:
            self._fail(r, "UNAVAILABLE", "no prefill/decode instance pair is serving")
            return None
        attempt, d, tokens = _Attempt(), None, len(r.prefill_tokens)
        p.attempts.add(attempt)
        p.waiting_tokens += tokens
        self._queued += 1
        waiting = True
        try:
            self._mark(r, "prefill_start")
            call = ipb.PrefillCall(id=r.id, prompt=r.prompt, output=r.output, sampling=wire.sampling(r.params))
            prefill = p.stub.Prefill(call)
            attempt.calls.append(prefill)
            handle = None
            async for ev in prefill:
                if ev.has_first_token:
                    self._mark(r, "prefill_end")
                    self._mark(r, "first_token")
                    lp = wire.logprob(ev.first_logprob) if r.params.logprobs else None
                    if self._take(r, ev.first_token, lp):
                        return None
                if ev.finish_reason:  # it stopped at its first token (the token above)
                    if not r.finished:
                        self._finish(r, ev.finish_reason)
                    return None
                if ev.HasField("prefix"):
                    handle = ev.prefix
                    break
            if handle is None:
                return f"{p.name} ended the prefill without a prefix"
            self._mark(r, "prefill_end")
            p.waiting_tokens -= tokens
            self._queued -= 1
            waiting = False
            d = self._pick_decode(r)
            if d is None:
                self._fail(r, "UNAVAILABLE", "no decode instance is serving that can hold the request")
                return None
            d.attempts.add(attempt)
            d.requests += 1
            call = ipb.DecodeCall(
                id=r.id, prompt=r.prompt, output=r.output, sampling=wire.sampling(r.params), prefix=handle
            )
            decode = d.stub.Decode(call)
            attempt.calls.append(decode)
            async for ev in decode:
                kind = ev.WhichOneof("event")
                if kind == "pulled":
                    prefill.cancel()  # the prefix is on the decode instance: end its lease
                    r.transfer_s += ev.pulled.transfer_s
                    r.transfer_bytes += ev.pulled.transfer_bytes
                    self._mark(r, "admitted")
                elif kind == "tokens":
                    lps = ev.tokens.logprobs
                    for i, token in enumerate(ev.tokens.ids):
                        if self._take(r, token, wire.logprob(lps[i]) if r.params.logprobs else None):
                            return None
                else:
                    end = ev.ended
                    if end.reason in ("stop", "length"):  # as append_token decided here too
                        if not r.finished:
                            self._finish(r, end.reason)
                        return None
                    if end.reason == "preempted":
                        return "preempted"
                    return f"{d.name}: {end.reason}: {end.message}"
            return f"{d.name} ended the decode without saying why"
        except grpc.aio.AioRpcError as e:
            where = d if d is not None else p
            if e.code() == grpc.StatusCode.UNAVAILABLE:  # not picked again until it reports again
                where.alive = False
                await self._update_health()
            return attempt.aborted or f"{where.name}: {e.code().name} {e.details()}"
        except asyncio.CancelledError:
            if attempt.aborted:  # its instance was lost (not this task cancelled)
                return attempt.aborted
            raise
        finally:
            if waiting:
                p.waiting_tokens -= tokens
                self._queued -= 1
            for c in attempt.calls:
                c.cancel()
            p.attempts.discard(attempt)
            if d is not None:
                d.attempts.discard(attempt)
                d.requests -= 1

    def _pick_prefill(self) -> Member | None:
        loads = {
            m.name: router.PrefillLoad(m.waiting_tokens, m.report.held_tokens if m.report else 0)
            for m in self.members.values()
            if m.role == "prefill" and m.serving
        }
        name = router.pick_prefill(loads)
        return self.members[name] if name is not None else None

    def _pick_decode(self, r: Request) -> Member | None:
        loads = {}
        for m in self.members.values():
            if m.role == "decode" and m.serving:
                total = m.report.pages_total if m.report and m.report.pages_total else m.info.pages - 1
                used = m.report.pages_used if m.report else 0
                loads[m.name] = router.DecodeLoad(m.requests, total - used, total, m.info.page_size)
        name = router.pick_decode(loads, r.position)
        return self.members[name] if name is not None else None

    # ---- updates (as the scheduling core makes them) ---------------------------------------

    def _take(self, r: Request, token: int, logprob) -> bool:
        if r.finished:
            return True
        reason = append_token(r, token, logprob, self.eos_ids, self.max_seq_len)
        if reason:
            r.finish_reason, r.state = reason, State.FINISHED
            self._mark(r, "finished")
        emit(r, [token], [logprob] if r.params.logprobs else [])
        return reason is not None

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.state = reason, State.FINISHED
        self._mark(r, "finished")
        emit(r, [], [])

    def _fail(self, r: Request, code: str, message: str) -> None:
        if r.finished:
            return
        logging.warning("request %d: %s", r.id, message)
        r.error, r.error_code = message, code
        self._finish(r, "error")

    def _mark(self, r: Request, event: str) -> None:
        r.times.setdefault(event, time.perf_counter())


class _RouterService(ipb_grpc.RouterServicer):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def Join(self, request, context):
        return ipb.JoinResponse(router=self.cluster.join(request.instance))

    async def Leave(self, request, context):
        self.cluster.leave(request.control)
        return ipb.LeaveResponse()
