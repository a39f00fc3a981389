"""One prefill or decode instance of a mesh preset in a process of its own, serving the
internal control plane (``proto/internal.proto``) to a router (``serving.router``).

Each process runs its own part of the scheduling core: a ``sched.Scheduler`` that holds this
one instance (a prefill process: its FCFS queue and prefix buffer; a decode process: its
slots, pages and preemption), driven like in one process — schedule -> execute -> update.

Threads and the event loop:
  * the worker thread runs the loop body (``_prefill_once`` / ``_decode_once``) and sleeps
    while the scheduler has nothing for it. A worker that raises ends every call with an
    error and the process exits (``failed``), so the router recomputes its requests elsewhere.
  * one asyncio event loop (its own thread) runs the ``grpc.aio`` server. A Prefill or Decode
    call owns one request: it builds the instance's copy of it, hands it to the scheduler
    and streams what the worker produces. ``Watch`` streams a load report every interval
    (the router's heartbeat); ``Stage`` cuts and offers a prefix (in a small thread pool).
  * the transfer server (``transfer.remote``) and its ticker.

Prefill: a prefilled request's prefix stays in this process under a lease
(``sched.lease``): the Prefill call stays open while the lease does. The router ends the call
once a decode process pulled the prefix or the request ended; the lease expires after
``lease_s`` otherwise and the call ends with DEADLINE_EXCEEDED. Either way the prefix is
freed (``Scheduler.hand_off`` or ``cancel``), so no KV is stranded.

Decode: the call hands over a prefix handle; the decode instance pulls it when it has a slot
and pages (``Scheduler.hold`` / ``take_pulls``), through ``transfer.remote.Remote``: Stage on
the prefill process, then a pull with a timeout. The call streams ``pulled``, the tokens,
and how it ended: stop or length; ``preempted`` (pages ran out: the router re-prefills it);
``transfer_failed`` (the router retries or fails it). A cancelled call frees its slot and pages.

A decode instance whose devices span processes (hosts) is one multi-controller JAX program
(``jax.distributed``): process 0 serves the control plane and decides as above; before each
device call it tells the others what to run (``runtime.lockstep``), and ``follow`` runs the
same calls there. Each process pulls its own shards' pieces from the prefill process.
(A prefill instance runs in one process for now.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import secrets
import threading
import time

import grpc
import grpc.aio
import jax
import jax.numpy as jnp
import prometheus_client as prom
from absl import logging

from jdisagg.model import axes, sharding
from jdisagg.preset import MeshPreset
from jdisagg.proto import internal_pb2 as ipb
from jdisagg.proto import internal_pb2_grpc as ipb_grpc
from jdisagg.runtime import workers
from jdisagg.runtime.instances import Instances
from jdisagg.runtime.lockstep import Lockstep
from jdisagg.sched.lease import Leases
from jdisagg.sched.pages import pages_for
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Output, Request, State
from jdisagg.sched.scheduler import Scheduler
from jdisagg.serving import wire
from jdisagg.transfer import remote

ROLES = ("prefill", "decode")
_HELD, _PULLED, _PREEMPTED, _TRANSFER_FAILED = "held", "pulled", "preempted", "transfer_failed"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def one_instance(preset: MeshPreset, role: str, index: int, devices: tuple[int, ...] | None = None) -> MeshPreset:
    """``preset`` cut down to its ``role`` instance ``index`` (renumbered 0), on ``devices``
    (indices into this process's ``jax.devices()``; default: the preset's)."""
    specs = preset.prefill if role == "prefill" else preset.decode
    if role not in ROLES or any(s.role != role for s in specs):
        raise ValueError(f"{preset.source or preset.name}: a process runs one prefill or decode instance (not {role})")
    if not 0 <= index < len(specs):
        raise ValueError(f"{preset.source or preset.name} has {len(specs)} {role} instance(s); no {role}[{index}]")
    spec = specs[index]
    devices = tuple(devices) if devices is not None else spec.devices
    if len(devices) != len(spec.devices):
        raise ValueError(f"{spec.where} needs {len(spec.devices)} device(s) (pp={spec.pp} tp={spec.tp}), not {devices}")
    return dataclasses.replace(preset, instances=(dataclasses.replace(spec, index=0, devices=devices),))


class InstanceMetrics:
    """What an instance process exports on ``/metrics`` (its own registry)."""

    def __init__(self):
        r = self.registry = prom.CollectorRegistry()
        self.leases = prom.Gauge("jdisagg_instance_leases", "Prefix leases open (prefill)", registry=r)
        self.lease_expiries = prom.Counter(
            "jdisagg_instance_lease_expiries", "Leases that expired before a pull", registry=r
        )
        self.prefilled = prom.Counter("jdisagg_instance_prefills", "Prompts prefilled", registry=r)
        self.queued = prom.Gauge("jdisagg_prefill_queue_depth", "Requests waiting for prefill", registry=r)
        self.held = prom.Gauge("jdisagg_prefilled_requests", "Prefixes waiting to be pulled", registry=r)
        self.running = prom.Gauge("jdisagg_running_requests", "Requests holding a decode slot", registry=r)
        self.pages_used = prom.Gauge("jdisagg_kv_pages_used", "KV pages in use", registry=r)
        self.pages_total = prom.Gauge("jdisagg_kv_pages_total", "KV pages in the pool", registry=r)
        self.transfer_failures = prom.Counter(
            "jdisagg_kv_transfer_failures", "Prefixes whose pull failed or timed out", registry=r
        )
        self.transfer = prom.Histogram(
            "jdisagg_kv_transfer_seconds", "Pulling a batch of prefixes", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.transfer_bytes = prom.Counter("jdisagg_kv_transfer_bytes", "KV bytes pulled", registry=r)
        self.pull_host = prom.Histogram(
            "jdisagg_kv_pull_host_seconds",
            "Decode worker time per pulled prefix (stage, start the pull; assemble, insert dispatch)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.abandoned = prom.Gauge("jdisagg_kv_pulls_abandoned", "Timed-out pulls still in flight", registry=r)

    def start(self, port: int, host: str):
        server, _ = prom.start_http_server(port, addr=host, registry=self.registry)
        return server


class _Faults:
    """Test-only faults (``Fault`` RPC; refused unless started with ``test_faults``)."""

    stage_hang = 0
    prefill_delay_s = 0.0


class InstanceServer:
    """Serves one instance (``role`` ``index`` of ``preset``) to a router."""

    def __init__(
        self,
        loaded,
        preset: MeshPreset,
        role: str,
        index: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        router: str | None = None,
        devices: tuple[int, ...] | None = None,
        lease_s: float = 60.0,
        transfer_timeout_s: float = 10.0,
        checksum: bool = False,
        overlap_pulls: bool = True,
        test_faults: bool = False,
    ):
        self.role, self.index, self.router_address = role, index, router
        self.lockstep = Lockstep() if jax.process_count() > 1 else None
        if self.lockstep is not None and role != "decode":
            raise ValueError("only a decode instance can span processes so far (--num_processes > 1)")
        self.lease_s, self.transfer_timeout_s, self.checksum = lease_s, transfer_timeout_s, checksum
        self.overlap_pulls = overlap_pulls
        self.preset = one_instance(preset, role, index, devices)
        self.spec = self.preset.instances[0]
        self.instances = Instances.build(loaded, self.preset)
        cfg, tokenizer = loaded.cfg, loaded.tokenizer
        eos_ids = tuple(tokenizer.eos_ids) if tokenizer else cfg.eos_ids
        self._wakeup = workers.Wakeup()
        self.sched = Scheduler(
            *self.instances.scheduler_specs(),
            max_seq_len=self.preset.max_seq_len,
            eos_ids=eos_ids,
            on_change=self._wakeup.notify,
        )
        self.metrics = InstanceMetrics()
        self.leases = Leases(lease_s, time.monotonic)
        self.transfer = remote.TransferServer(host, advertise=advertise)
        self.remote, self.layouts = None, []
        if role == "decode":
            self.remote = remote.Remote(self.transfer, self._stage, timeout_s=transfer_timeout_s, checksum=checksum)
            self.layouts = self._layouts()
        self.faults = _Faults() if test_faults else None
        self.follower = self.lockstep is not None and not self.lockstep.leader  # runs ``follow``
        self.failed = threading.Event()
        self.draining = False
        self._stop = threading.Event()
        self._waiters: dict[int, asyncio.Queue] = {}  # request id -> its call's queue of worker events
        self._pulling: list = []  # decode: (pulls, remote.Pulling, worker seconds so far) in flight
        self._stage_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="stage")
        self._stubs: dict[str, ipb_grpc.InstanceStub] = {}  # prefill control address -> stub (decode)
        self._stubs_lock = threading.Lock()
        self._last_watched = time.monotonic()
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="control-loop", daemon=True)
        self._loop_thread.start()
        self._host, self._advertise = host, advertise or host
        self.grpc, self.port = (None, 0) if self.follower else self._run(self._build(host, port))
        self.control = f"{self._advertise}:{self.port}"
        self.worker = threading.Thread(target=self._work, name=self.spec.where, daemon=True)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _build(self, host: str, port: int):
        server = grpc.aio.server(options=wire.SERVER_OPTIONS)
        ipb_grpc.add_InstanceServicer_to_server(_Service(self), server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await server.start()
        return server, bound

    @property
    def name(self) -> str:
        return f"{self.role}[{self.index}]"

    def info(self) -> ipb.InstanceInfo:
        s = self.spec
        decode = self.instances.decode[0] if self.instances.decode else None
        return ipb.InstanceInfo(
            role=self.role,
            index=self.index,
            control=self.control,
            transfer=self.transfer.address,
            max_batch=s.max_batch,
            pages=decode.n_pages if decode else 0,
            page_size=self.preset.page_size,
            buffer_tokens=s.buffer_tokens,
            processes=jax.process_count(),
            mesh=f"pp={s.pp} tp={s.tp}" if s.pp > 1 else f"tp={s.tp}",
            layouts=self.layouts,
        )

    def _prefix_shape(self, t: int) -> tuple[int, ...]:
        cfg = self.instances.prefill[0].cfg if self.instances.prefill else self.instances.decode[0].cfg
        return (cfg.n_layers, t, cfg.n_kv_heads, cfg.head_dim)

    def _layouts(self) -> list[ipb.Layout]:
        """Decode: the boxes each of its processes pulls, for a prefix of every length bucket."""
        out = []
        for t in self.instances.length_buckets:
            shape = self._prefix_shape(t)
            parts, _ = remote.parts_of(self.instances.decode[0].prefix_sharding, shape)
            layout = ipb.Layout(shape=shape)
            for part in parts:
                layout.parts.add(boxes=[_box_msg(box) for _, box in part])
            out.append(layout)
        return out

    # ---- lifecycle -----------------------------------------------------------------------

    def warm_up(self, progress: bool = False) -> float:
        """Compiles every program shape of the instance (as one process does), and on a decode
        instance the checksums of the pieces it pulls. The prefill side's cuts into a decode
        instance's layout compile when the router asks (``prepare``)."""
        seconds = self.instances.warm_up(progress)
        if self.checksum and self.role == "decode":
            start = time.perf_counter()
            for t in self.instances.length_buckets:
                parts, me = remote.parts_of(self.instances.decode[0].prefix_sharding, self._prefix_shape(t))
                dtype = self.instances.decode[0].cfg.dtype
                remote.kv_checksum([jax.device_put(jnp.zeros(_extent(b), dtype), d) for d, b in parts[me]])
            seconds += time.perf_counter() - start
        return seconds

    def start(self) -> None:
        """Starts the worker, the lease keeper and (with a router) joining it."""
        self.worker.start()
        asyncio.run_coroutine_threadsafe(self._keep_leases(), self.loop)
        if self.router_address:
            asyncio.run_coroutine_threadsafe(self._stay_joined(), self.loop)

    def drain(self, timeout: float) -> None:
        """Leaves the router (no new requests), lets the calls in flight end, then stops."""
        self.draining = True
        if self.router_address:
            try:
                self._run(self._leave())
            except grpc.aio.AioRpcError as e:  # it is gone or stopping too
                logging.warning("could not leave the router: %s", e.code().name)
        deadline = time.monotonic() + timeout
        while self._waiters and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.notify()
        if self.grpc is not None:
            self._run(self.grpc.stop(grace=1))
        if self.worker.is_alive():
            self.worker.join(timeout=10)
        self.transfer.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)

    async def _router_stub(self):
        channel = grpc.aio.insecure_channel(self.router_address, options=wire.CONTROL_OPTIONS)
        return channel, ipb_grpc.RouterStub(channel)

    async def _stay_joined(self) -> None:
        """Joins the router, and joins again whenever it stops watching (it restarted)."""
        joined = False
        while not self._stop.is_set():
            stale = time.monotonic() - self._last_watched > 5.0
            if not self.draining and (not joined or stale):
                channel, stub = await self._router_stub()
                try:
                    reply = await stub.Join(ipb.JoinRequest(instance=self.info()), timeout=5)
                    logging.info("joined the router at %s as %s", self.router_address, reply.router)
                    joined, self._last_watched = True, time.monotonic()
                except grpc.aio.AioRpcError as e:
                    if not joined or stale:
                        logging.info("router %s not reachable yet (%s)", self.router_address, e.code().name)
                finally:
                    await channel.close()
            await asyncio.sleep(1.0)

    async def _leave(self) -> None:
        channel, stub = await self._router_stub()
        try:
            await stub.Leave(ipb.LeaveRequest(control=self.control), timeout=5)
        finally:
            await channel.close()

    def _work(self) -> None:
        once = self._prefill_once if self.role == "prefill" else self._decode_once
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                seen = self._wakeup.count()
                if once():
                    last = time.monotonic()
                    continue
                self._wakeup.wait(seen, timeout=0.5)
                if self.lockstep is not None and time.monotonic() - last > 10:
                    self.lockstep.send({"op": "idle"})  # the other processes wait in a collective
                    last = time.monotonic()
            if self.lockstep is not None:
                self.lockstep.send({"op": "stop"})
        except Exception as e:  # a dead worker must not leave calls hanging
            logging.exception("worker %s failed", self.name)
            self.sched.fail_all(f"{self.name} failed: {e}")
            self.failed.set()

    def _post(self, r: Request, event) -> None:
        """Hands a worker event to the call that owns ``r`` (if it is still there)."""
        queue = self._waiters.get(r.id)
        if queue is not None:
            self.loop.call_soon_threadsafe(queue.put_nowait, event)

    # ---- prefill -------------------------------------------------------------------------

    def _prefill_once(self) -> bool:
        batch = self.sched.take_prefill(0)
        if batch is None:
            return False
        if self.faults is not None and self.faults.prefill_delay_s:
            time.sleep(self.faults.prefill_delay_s)
        try:
            prefixes = self.instances.prefill[0].run(batch.prompts, batch.params)
        except Exception as e:  # the batch is in no queue now: end it here, then let the worker die
            self.sched.fail(batch.requests, f"prefill failed: {e}")
            raise
        self.sched.prefilled(0, batch, prefixes)
        self.metrics.prefilled.inc(len(batch.requests))
        for r in batch.requests:
            if r.state is State.PREFILLED:
                self._post(r, _HELD)
        return True

    async def prefill(self, call: ipb.PrefillCall, context):
        """One request's prefill, then its lease (see the module docstring)."""
        if self.role != "prefill":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.name} does not prefill")
        r = wire.request(call.prompt, call.output, call.sampling)
        events: asyncio.Queue = asyncio.Queue()
        r.listener = lambda out: self.loop.call_soon_threadsafe(events.put_nowait, out)
        self._waiters[r.id] = events
        uuid, expired = None, asyncio.Event()
        self.sched.submit(r)
        try:
            while uuid is None:
                event = await events.get()
                if isinstance(event, Output):
                    if r.error:
                        await context.abort(grpc.StatusCode.INTERNAL, r.error)
                    msg = ipb.PrefillEvent(finish_reason=r.finish_reason if event.finished else "")
                    if event.tokens:
                        msg.has_first_token, msg.first_token = True, event.tokens[0]
                        if event.logprobs:
                            msg.first_logprob.CopyFrom(wire.logprob_msg(event.logprobs[0]))
                    yield msg
                    if event.finished:
                        return
                elif event == _HELD:
                    uuid = secrets.randbits(55) << 8  # parts are offered as uuid + part (< 256)
                    self.leases.grant(uuid, (r, expired))
                    p = r.prefix
                    yield ipb.PrefillEvent(
                        prefix=ipb.PrefixHandle(
                            uuid=uuid,
                            transfer=self.transfer.address,
                            control=self.control,
                            length=p.length,
                            held_tokens=p.held_tokens,
                            nbytes=p.nbytes,
                            shape=list(p.k.shape),
                            dtype=str(p.k.dtype),
                        )
                    )
            await expired.wait()  # the router ends the call before this, unless the lease expires
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the prefix's lease expired ({self.lease_s:g} s)")
        finally:
            self._waiters.pop(r.id, None)
            if uuid is not None:
                self.leases.release(uuid)
            if r.state is State.PREFILLED:
                self.sched.hand_off(r)  # pulled, or nobody will: either way it is not needed here
            elif not r.finished:
                self.sched.cancel(r)

    async def _keep_leases(self) -> None:
        while not self._stop.is_set():
            for lease in self.leases.expire():
                _, expired = lease.holder
                expired.set()
                self.metrics.lease_expiries.inc()
            await asyncio.sleep(0.1)

    async def prepare(self, req: ipb.PrepareRequest, context) -> ipb.PrepareResponse:
        """Compiles the cuts of a prefix into each of ``req.layouts`` (a decode instance's), so
        the first Stage into them does not wait on the compiler."""
        if self.role != "prefill":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.name} does not prefill")
        runner = self.instances.prefill[0]
        dst = sharding.named_sharding(runner.mesh, axes.PREFIX_AXES, self.spec.rules)
        checksum = self.checksum or req.checksum

        def compile_cuts() -> float:
            start = time.perf_counter()
            for layout in req.layouts:
                zeros = jax.device_put(jnp.zeros(tuple(layout.shape), runner.cfg.dtype), dst)
                parts = [[_box(b) for b in part.boxes] for part in layout.parts]
                for pieces in remote.cut(zeros, zeros, parts):
                    jax.block_until_ready(pieces)
                    if checksum:
                        remote.kv_checksum(pieces)
            return time.perf_counter() - start

        seconds = await self.loop.run_in_executor(self._stage_pool, compile_cuts)
        logging.info("prepared the cuts into %d layout(s) in %.1fs", len(req.layouts), seconds)
        return ipb.PrepareResponse(seconds=seconds)

    async def stage(self, req: ipb.StageRequest, context) -> ipb.StageResponse:
        """Cuts a leased prefix into a decode instance's boxes and offers it for pulling."""
        lease = self.leases.get(req.uuid)
        prefix = lease.holder[0].prefix if lease is not None else None
        if prefix is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no prefix under lease {req.uuid:#x} (expired or ended)")
        if self.faults is not None and self.faults.stage_hang > 0:
            self.faults.stage_hang -= 1
            logging.warning("test fault: not offering lease %#x", req.uuid)
            return ipb.StageResponse(checksums=[0] * len(req.parts))
        parts = [[_box(b) for b in part.boxes] for part in req.parts]
        sums = await self.loop.run_in_executor(
            self._stage_pool,
            remote.stage,
            self.transfer,
            req.uuid,
            prefix.k,
            prefix.v,
            parts,
            req.timeout_s,
            req.checksum,
        )
        return ipb.StageResponse(checksums=sums)

    # ---- decode --------------------------------------------------------------------------

    def _stage(self, p: remote.RemotePrefix, parts) -> list[int]:
        """``Remote``'s stage callable: the Stage call on the prefill process (worker thread)."""
        with self._stubs_lock:
            stub = self._stubs.get(p.source)
            if stub is None:
                stub = self._stubs[p.source] = ipb_grpc.InstanceStub(
                    grpc.insecure_channel(p.source, options=wire.CONTROL_OPTIONS)
                )
        req = ipb.StageRequest(uuid=p.uuid, timeout_s=self.transfer_timeout_s, checksum=self.checksum)
        for boxes in parts:
            req.parts.add(boxes=[_box_msg(b) for b in boxes])
        return list(stub.Stage(req, timeout=self.transfer_timeout_s).checksums)

    def _decode_once(self) -> bool:
        """Lands the pulls whose KV arrived, starts pulls for the prefixes it has room for, and
        runs one step. In one process a pull runs while the steps go on (the KV moves through
        the transfer server's threads; ``overlap_pulls``); across processes it is waited for,
        in lockstep."""
        sched, runner = self.sched, self.instances.decode[0]
        worked = self._land_arrived()
        pulls = sched.take_pulls(0)
        if pulls:
            start = time.perf_counter()
            prefixes = [p.prefix for p in pulls]
            staged = self.remote.stage_all(prefixes, runner.prefix_sharding)
            if self.lockstep is None and self.overlap_pulls:
                pulling = self.remote.begin(prefixes, runner.prefix_sharding, staged)
                self._pulling.append((pulls, pulling, time.perf_counter() - start))
            else:
                if self.lockstep is not None:
                    ops = [_prefix_op(p.prefix, s, p.pages) for p, s in zip(pulls, staged, strict=True)]
                    self.lockstep.send({"op": "pull", "prefixes": ops})
                moved = self._fetch(prefixes, staged)
                waited = time.perf_counter() - start
                self._land(pulls, moved, waited, waited)
            worked = True
        stepped = workers.step_once(sched, 0, runner, before=self._announce_step)
        for r in sched.queue.drain():  # preempted: the router re-prefills them elsewhere
            self._post(r, _PREEMPTED)
        if not stepped:
            if self._pulling and not worked:
                time.sleep(0.0005)  # only pulls in flight: poll them
            return worked or bool(self._pulling)
        return True

    def _announce_step(self, batch) -> None:
        """Tells the instance's other processes (multi-host) to run the same step."""
        if self.lockstep is not None:
            params = [dataclasses.asdict(p) for p in batch.params]
            self.lockstep.send(
                {
                    "op": "step",
                    "rows": [batch.tokens, batch.positions, batch.page_tables],
                    "params": params,
                    "steps": batch.steps,
                }
            )

    def _land_arrived(self) -> bool:
        """Lands the pulls in flight whose data arrived (or whose timeout passed)."""
        done = [x for x in self._pulling if x[1].ready()]
        for x in done:
            self._pulling.remove(x)
            pulls, pulling, host = x
            self._land(pulls, pulling.finish(), time.perf_counter() - pulling.started, host)
        return bool(done)

    def _land(self, pulls, moved, seconds: float, host: float) -> None:
        """Inserts the pulled prefixes into their pages (``host``: the worker's time on them so far)."""
        sched, runner = self.sched, self.instances.decode[0]
        start = time.perf_counter()
        done = []
        for pull, m in zip(pulls, moved, strict=True):
            if pull.request.finished:  # cancelled meanwhile: its pages may be someone else's now
                continue
            if isinstance(m, Exception):
                logging.warning("request %d: %s", pull.request.id, m)
                self.metrics.transfer_failures.inc()
                self._post(pull.request, (_TRANSFER_FAILED, str(m)))
                sched.fail([pull.request], f"KV transfer failed: {m}")
                continue
            try:
                runner.insert(*m, _insert_pages(pull.pages, pull.prefix.length, runner.page_size))
            except Exception as e:
                sched.fail([p.request for p in pulls], f"KV insert failed: {e}")
                raise
            done.append(pull)
        sched.pulled(0, done, seconds)
        host = (host + time.perf_counter() - start) / len(pulls)
        self.metrics.transfer.observe(seconds)
        for pull in done:
            self.metrics.pull_host.observe(host)
            self.metrics.transfer_bytes.inc(pull.prefix.nbytes)
            self._post(pull.request, _PULLED)

    def _fetch(self, prefixes, staged) -> list:
        """This process's part of each staged prefix; with other processes, only those that
        arrived on every one of them (the rest fail everywhere)."""
        moved = self.remote.fetch(prefixes, self.instances.decode[0].prefix_sharding, staged)
        if self.lockstep is None:
            return moved
        everywhere = self.lockstep.agree([not isinstance(m, Exception) for m in moved])
        return [
            m if ok else (m if isinstance(m, Exception) else remote.TransferFailed("another process's part failed"))
            for m, ok in zip(moved, everywhere, strict=True)
        ]

    def follow(self) -> None:
        """A process > 0 of a multi-host decode instance: makes the device calls process 0
        announces, until it says stop."""
        runner = self.instances.decode[0]
        while True:
            op = self.lockstep.receive()
            if op["op"] == "stop":
                return
            if op["op"] == "pull":
                prefixes, staged, pages = [], [], []
                for p in op["prefixes"]:
                    shape = tuple(p["shape"])
                    prefixes.append(
                        remote.RemotePrefix(
                            0, None, p["length"], shape[1], p["nbytes"], shape, p["dtype"], p["transfer"], p["uuid"]
                        )
                    )
                    staged.append(p["sums"] if p["sums"] is not None else remote.TransferFailed("not staged"))
                    pages.append(p["pages"])
                for prefix, m, ids in zip(prefixes, self._fetch(prefixes, staged), pages, strict=True):
                    if not isinstance(m, Exception):
                        runner.insert(*m, _insert_pages(ids, prefix.length, runner.page_size))
            elif op["op"] == "step":
                params = [SamplingParams(**_params(p)) for p in op["params"]]
                runner.step(*op["rows"], params, op["steps"])

    async def decode(self, call: ipb.DecodeCall, context):
        """Decodes one request from a prefix held by a prefill process."""
        if self.role != "decode":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.name} does not decode")
        h = call.prefix
        r = wire.request(call.prompt, call.output, call.sampling)
        shape = tuple(h.shape)
        prefix = remote.RemotePrefix(
            r.output[-1], None, h.length, h.held_tokens, h.nbytes, shape, h.dtype, h.transfer, h.uuid, h.control
        )
        events: asyncio.Queue = asyncio.Queue()
        r.listener = lambda out: self.loop.call_soon_threadsafe(events.put_nowait, out)
        self._waiters[r.id] = events
        self.sched.hold(r, prefix)
        try:
            while True:
                event = await events.get()
                if isinstance(event, Output):
                    if event.tokens:
                        lps = [wire.logprob_msg(lp) for lp in event.logprobs]
                        yield ipb.DecodeEvent(tokens=ipb.Tokens(ids=event.tokens, logprobs=lps))
                    if event.finished:
                        reason, message = ("error", r.error) if r.error else (r.finish_reason, "")
                        yield ipb.DecodeEvent(ended=ipb.Ended(reason=reason, message=message or ""))
                        return
                elif event == _PULLED:
                    yield ipb.DecodeEvent(pulled=ipb.Pulled(transfer_s=r.transfer_s, transfer_bytes=r.transfer_bytes))
                elif event == _PREEMPTED:
                    yield ipb.DecodeEvent(ended=ipb.Ended(reason="preempted"))
                    return
                else:  # (_TRANSFER_FAILED, why)
                    yield ipb.DecodeEvent(ended=ipb.Ended(reason=event[0], message=event[1]))
                    return
        finally:
            self._waiters.pop(r.id, None)
            if not r.finished:
                self.sched.cancel(r)

    # ---- load ----------------------------------------------------------------------------

    def report(self) -> ipb.LoadReport:
        load = self.sched.load()
        m = self.metrics
        out = ipb.LoadReport(queued=load.queued, leases=len(self.leases), draining=self.draining)
        out.lease_expiries = self.leases.expired_total
        if self.role == "prefill":
            with self.sched.lock:
                out.queued_tokens = sum(len(r.prefill_tokens) for r in self.sched.queue)
            out.held, out.held_tokens = load.prefilled[0], load.held_tokens[0]
            m.queued.set(load.queued)
            m.held.set(load.prefilled[0])
            m.leases.set(len(self.leases))
        else:
            out.running, out.pages_used, out.pages_total = load.running[0], load.pages_used[0], load.pages_total[0]
            out.waiting = len(self.sched.held)
            out.transfer_failures = self.remote.failures
            m.running.set(load.running[0])
            m.pages_used.set(load.pages_used[0])
            m.pages_total.set(load.pages_total[0])
            m.abandoned.set(len(self.remote.abandoned))
        return out

    async def watch(self, req: ipb.WatchRequest, context):
        interval = max(0.05, req.interval_s or 0.5)
        while True:
            self._last_watched = time.monotonic()
            yield self.report()
            await asyncio.sleep(interval)

    async def fault(self, req: ipb.FaultRequest, context) -> ipb.FaultResponse:
        if self.faults is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "started without --test_faults")
        self.faults.stage_hang, self.faults.prefill_delay_s = req.stage_hang, req.prefill_delay_s
        return ipb.FaultResponse()


def _insert_pages(pages: list[int], length: int, page_size: int) -> list[int]:
    """The pages a pulled prefix of ``length`` tokens is written to."""
    return pages[: pages_for(length, page_size)]


def _prefix_op(p: remote.RemotePrefix, staged, pages: list[int]) -> dict:
    """What the other processes of a multi-host decode instance need to pull ``p`` too."""
    sums = None if isinstance(staged, Exception) else list(staged)
    fields = dict(transfer=p.transfer, uuid=p.uuid, shape=list(p.shape), dtype=p.dtype, length=p.length)
    return dict(fields, nbytes=p.nbytes, sums=sums, pages=list(pages))


def _params(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _box_msg(box) -> ipb.Box:
    return ipb.Box(start=[lo for lo, _ in box], stop=[hi for _, hi in box])


def _box(msg: ipb.Box):
    return tuple(zip(msg.start, msg.stop, strict=True))


def _extent(box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


class _Service(ipb_grpc.InstanceServicer):
    def __init__(self, instance: InstanceServer):
        self.i = instance

    async def Watch(self, request, context):
        async for m in self.i.watch(request, context):
            yield m

    async def Prefill(self, request, context):
        async for m in self.i.prefill(request, context):
            yield m

    async def Prepare(self, request, context):
        return await self.i.prepare(request, context)

    async def Stage(self, request, context):
        return await self.i.stage(request, context)

    async def Decode(self, request, context):
        async for m in self.i.decode(request, context):
            yield m

    async def Fault(self, request, context):
        return await self.i.fault(request, context)
