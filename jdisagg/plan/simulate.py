"""Discrete-event simulation of a preset serving a workload, driving the scheduling core itself.

The simulator runs the real ``jdisagg.sched.Scheduler`` on a virtual clock. Each instance is
a generator that mirrors its loop body in ``jdisagg.runtime.workers`` verb for verb (schedule
-> execute -> update) and yields how long the execution takes, from the profile's fits
(``system.System``): prefill calls (FCFS token-budget batches, back-pressure from the
prefill buffer), pulls (transfer + insert, on the decode instance's time), decode steps
(continuous batching, page limits, preemption) and chunked mixed steps. An instance with
nothing to do sleeps until a verb changes the scheduler (``on_change``), as the server's
workers do. So the policy simulated is the policy served.

Arrivals, lengths and clipping come from ``jdisagg.bench.workloads`` exactly as
``jdisagg.bench run`` makes them (same seed, same requests); each point starts on an idle
system; with ``warmup_s`` the earlier arrivals load the system but are not counted.
Attainment, goodput and the latency summary come from ``jdisagg.bench.stats``. A run is a
pure function of its inputs: the same seed gives the same numbers.

Each call's time has a device part (the fits) and a host part (``System.host_seconds``: the
scheduler's work per step and row, and the server's per streamed token, calibrated). The
instances of one server process share one interpreter, so host parts run one at a time
across instances: on many GPUs in one process the host becomes the limit, as it does in the
server. What is not simulated: other processes on the host, the client and gRPC on the way
in, and the spread of per-token gaps (a request's tokens are taken as evenly spaced between
its first and last, which is all TPOT and attainment read).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jdisagg.bench import stats, workloads
from jdisagg.bench.stats import RequestResult, Slo
from jdisagg.plan.system import Instance, System
from jdisagg.runtime.buckets import bucket_for
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Request
from jdisagg.sched.scheduler import Scheduler

IDLE = None  # what a worker yields when it waits for the scheduler to change; else (device s, host s)
TOKEN = 1  # every sampled token (requests ignore EOS and stop at their output length)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to send: a length distribution (or a trace) and how to judge it."""

    name: str  # one of workloads.WORKLOADS
    slo: Slo
    target: float = 0.9
    cv: float = 1.0
    seed: int = 0
    warmup_s: float = 6.0  # arrivals this long before the counted ones (as bench run --warmup_s)
    duration_s: float = 12.0  # counted arrivals per point
    input_len: int = 512  # fixed
    output_len: int = 64  # fixed
    humaneval_path: str | None = None  # code
    trace: Sequence[workloads.TraceEntry] = ()  # trace: its entries

    def lengths(self, n: int) -> list[tuple[int, int]]:
        if self.name == "trace":
            return [(e.input_len, e.output_len) for e in self.trace][:n]
        opts = dict(input_len=self.input_len, output_len=self.output_len, humaneval_path=self.humaneval_path)
        return workloads.lengths_for(self.name, n, self.seed, **opts)

    def mean_lengths(self, n: int = 2000) -> tuple[float, float]:
        pairs = self.lengths(n)
        return float(np.mean([i for i, _ in pairs])), float(np.mean([o for _, o in pairs]))

    def trace_rate(self) -> float:
        t = [e.timestamp for e in self.trace]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0


@dataclasses.dataclass(frozen=True)
class Arrivals:
    """One point's requests: send times (s from the point's start), lengths (clipped), and
    how many of the first ones are warm-up (not counted)."""

    rate: float
    times: np.ndarray
    lengths: list[tuple[int, int]]
    warmup: int


def points(w: Workload, rates: Sequence[float], max_seq_len: int) -> list[Arrivals]:
    """The sweep ``jdisagg.bench run`` sends for ``rates`` (``loadgen.plan_points``): one
    arrival pattern per seed scaled by 1/rate, and the same requests at every rate. A trace
    is replayed at ``rate / its own rate`` times its speed."""
    if w.name == "trace":
        return [trace_point(w, r / w.trace_rate(), max_seq_len) for r in rates]
    span = w.warmup_s + w.duration_s
    schedules = [workloads.arrival_times(r, w.cv, w.seed, duration_s=span) for r in rates]
    n = max(len(s) for s in schedules)
    pairs = [workloads.clip(i, o, max_seq_len)[:2] for i, o in w.lengths(n)]
    return [Arrivals(r, s, pairs[: len(s)], int(np.sum(s < w.warmup_s))) for r, s in zip(rates, schedules, strict=True)]


def trace_point(w: Workload, speed: float, max_seq_len: int) -> Arrivals:
    """A trace replayed ``speed`` times faster; its rate is the trace's rate times ``speed``."""
    times = workloads.trace_arrivals(w.trace, speed)
    pairs = [workloads.clip(e.input_len, e.output_len, max_seq_len)[:2] for e in w.trace]
    return Arrivals(w.trace_rate() * speed, times, pairs, 0)


@dataclasses.dataclass
class Outcome:
    """One simulated point."""

    rate: float
    results: list[RequestResult]  # counted requests, in arrival order
    attainment: float
    gave_up: bool = False  # stopped once the target could no longer be met (attainment is an upper bound)
    sim_s: float = 0.0  # virtual seconds simulated
    steps: int = 0
    busy: dict[str, float] = dataclasses.field(default_factory=dict)  # per instance: fraction of time busy
    full_batch: float = 0.0  # fraction of decode steps at max_batch
    page_bound: float = 0.0  # fraction of decode steps where pages, not slots, kept a prefix waiting
    pull_share: float = 0.0  # of the decode instances' busy time, the part spent pulling prefixes
    host_busy: float = 0.0  # fraction of the time the one interpreter was busy
    slo: Slo = Slo(math.inf, math.inf)

    def summary(self, gpus: int) -> dict:
        """``stats.summarize_point`` of the counted requests, as ``bench run`` reports a point."""
        return stats.summarize_point(self.rate, self.results, self.slo, gpus)


class _Prefix:
    """What a simulated prefill call hands the scheduler (``sched.request.Prefix``)."""

    __slots__ = ("first_token", "first_logprob", "length", "held_tokens", "nbytes")

    def __init__(self, length: int, held: int, nbytes: int):
        self.first_token, self.first_logprob = TOKEN, None
        self.length, self.held_tokens, self.nbytes = length, held, nbytes


class Simulation:
    """One point: the system, its requests, a virtual clock."""

    def __init__(self, system: System, arrivals: Arrivals, slo: Slo | None = None, give_up_below: float = 0.0):
        self.system, self.arrivals = system, arrivals
        self.now = 0.0
        self.changes = 0
        preset = system.preset
        self.sched = Scheduler(
            system.prefill_specs,
            system.decode_specs,
            max_seq_len=preset.max_seq_len,
            eos_ids=(),
            clock=lambda: self.now,
            on_change=self._changed,
        )
        self.kv_per_token = system.profile.cfg.kv_bytes_per_token(_itemsize(system.profile.cfg.dtype))
        self.slo, self.give_up_below = slo, give_up_below
        self.tokens = [TOKEN] * (1 + max([s.max_batch for s in system.decode_specs] or [1]))
        self.logprobs = [None] * len(self.tokens)
        self._params: dict[int, SamplingParams] = {}
        self.requests: list[Request] = []
        self.ended: set[int] = set()  # ids of finished requests
        self.first_counted = -1  # id of the first request after the warm-up
        self.done = 0
        self.misses = 0
        self.busy = [0.0] * len(system.instances)
        self.steps = self.full_steps = self.page_bound_steps = 0
        self.pull_s = self.step_s = self.host_s = 0.0
        self.gave_up = False

    # ---- scheduler plumbing -------------------------------------------------------------

    def _changed(self) -> None:
        self.changes += 1

    def _prefixes(self, prompts: Sequence[list[int]]) -> list[_Prefix]:
        out = []
        for p in prompts:
            held = bucket_for(len(p), self.system.length_buckets)
            out.append(_Prefix(len(p), held, held * self.kv_per_token))
        return out

    def _ended(self, requests: Sequence[Request]) -> None:
        """Counts requests that finished in the last verb (misses too, to give up early)."""
        counted = len(self.arrivals.times) - self.arrivals.warmup
        for r in requests:
            if r.finished and r.id not in self.ended:
                self.ended.add(r.id)
                self.done += 1
                if self.slo is not None and 0 <= self.first_counted <= r.id and not _meets(r, self.slo):
                    self.misses += 1
                    if self.give_up_below and self.misses > (1 - self.give_up_below) * counted:
                        self.gave_up = True

    # ---- worker loop bodies (mirroring jdisagg.runtime.workers) --------------------------

    def prefill_once(self, i: int, inst: Instance) -> Iterator:
        batch = self.sched.take_prefill(i)
        if batch is None:
            return False
        first = sum(not r.output for r in batch.requests)  # first tokens it streams
        yield self.system.prefill_seconds(inst, [len(p) for p in batch.prompts]), self.system.host_seconds(first, False)
        self.sched.prefilled(i, batch, self._prefixes(batch.prompts))
        self._ended(batch.requests)
        return True

    def decode_once(self, d: int, inst: Instance) -> Iterator:
        sched = self.sched
        pulls = sched.take_pulls(d)
        if pulls:
            moved, busy = self.system.pull_seconds(inst, pulls)
            self.pull_s += busy
            yield busy, 0.0
            sched.pulled(d, pulls, moved)
        batch = sched.take_step(d)
        if batch is None:
            return bool(pulls)
        n = len(batch.requests)
        self._count_step(d, n)
        seconds = self.system.step_seconds(inst, batch) * inst.spec.steps_per_call  # a call's steps
        self.step_s += seconds
        yield seconds, self.system.host_seconds(sum(batch.steps))
        sched.sampled(d, batch, [[TOKEN] * k for k in batch.steps], [[None] * k for k in batch.steps])
        self._ended(batch.requests)
        return True

    def chunked_once(self, d: int, inst: Instance) -> Iterator:
        step = self.sched.take_chunk_step(d)
        if step is None:
            return False
        n = len(step.batch.requests)
        self._count_step(d, n)
        seconds = self.system.mixed_seconds(inst, step)
        self.step_s += seconds
        n += step.chunk is not None
        yield seconds, self.system.host_seconds(n)
        self.sched.chunk_sampled(d, step, self.tokens[:n], self.logprobs[:n])
        self._ended([*step.batch.requests, *[step.chunk] * (step.chunk is not None)])
        return True

    def _count_step(self, d: int, rows: int) -> None:
        self.steps += 1
        slots = self.sched.decode[d]
        if rows >= slots.max_batch:
            self.full_steps += 1
            return
        waiting = next((r for r in self.sched.held if slots.takes(r.prefill_instance)), None)
        if waiting is not None and len(slots) < slots.max_batch and not slots.can_admit(waiting):
            self.page_bound_steps += 1  # a prefix waits although a slot is free: pages hold it back

    def loops(self) -> list[Callable[[], Iterator]]:
        """One loop body per instance, as ``workers.loops`` makes them."""
        out = []
        for inst in self.system.instances:
            role, i, d = inst.spec.role, inst.prefill_index, inst.decode_index
            if role == "prefill":
                out.append(lambda i=i, inst=inst: self.prefill_once(i, inst))
            elif role == "decode":
                out.append(lambda d=d, inst=inst: self.decode_once(d, inst))
            elif role == "chunked":
                out.append(lambda d=d, inst=inst: self.chunked_once(d, inst))
            else:  # colocated: prefill first, then decode, on one mesh

                def colocated(i=i, d=d, inst=inst):
                    return (yield from self.prefill_once(i, inst)) or (yield from self.decode_once(d, inst))

                out.append(colocated)
        return out

    def _worker(self, once: Callable[[], Iterator]) -> Iterator:
        """``Server._work``: run the body; when it found nothing and nothing changed meanwhile, sleep."""
        while True:
            seen = self.changes
            did = yield from once()
            if not did and self.changes == seen:
                yield IDLE

    # ---- the event loop -------------------------------------------------------------------

    def run(self) -> Outcome:
        a = self.arrivals
        workers = [self._worker(once) for once in self.loops()]
        heap: list[tuple[float, int, int]] = []  # (time, seq, worker)
        idle: list[int] = []
        seq = 0

        host_free = 0.0  # when the one interpreter is next free (host parts run one at a time)

        def advance(w: int) -> None:
            nonlocal seq, host_free
            call = next(workers[w])
            if call is IDLE:
                idle.append(w)
                return
            device, host = call
            start = max(self.now, host_free) if host else self.now
            host_free = start + host if host else host_free
            self.host_s += host
            done = start + host + device
            self.busy[w] += done - self.now
            seq += 1
            heapq.heappush(heap, (done, seq, w))

        def settle(before: int) -> None:
            while idle and self.changes != before:
                before = self.changes
                woken = sorted(idle)
                idle.clear()
                for w in woken:
                    advance(w)

        for w in range(len(workers)):
            advance(w)
        total = len(a.times)
        k = 0
        while (k < total or self.done < total) and not self.gave_up:
            if k < total and (not heap or a.times[k] <= heap[0][0]):
                self.now = float(a.times[k])
                before = self.changes
                while k < total and a.times[k] <= self.now:  # arrivals at one instant, then the workers
                    self._submit(k)
                    k += 1
            elif heap:
                self.now, _, w = heapq.heappop(heap)
                before = self.changes
                advance(w)
            else:
                raise RuntimeError(
                    f"the simulated {self.system.preset.name} cannot make progress "
                    f"({self.done} of {total} requests done): is a request larger than every page pool?"
                )
            settle(before)
        results = [_result(r) for r in self.requests[a.warmup :]]
        attainment = stats.attainment(results, self.slo) if self.slo is not None and results else 0.0
        if self.gave_up:
            attainment = min(attainment, self.give_up_below - 1e-9)
        names = [i.spec.where for i in self.system.instances]
        out = Outcome(
            a.rate,
            results,
            attainment,
            self.gave_up,
            self.now,
            self.steps,
            {n: b / self.now if self.now else 0.0 for n, b in zip(names, self.busy, strict=True)},
            self.full_steps / self.steps if self.steps else 0.0,
            self.page_bound_steps / self.steps if self.steps else 0.0,
            self.pull_s / (self.pull_s + self.step_s) if self.step_s else 0.0,
            self.host_s / self.now if self.now else 0.0,
            self.slo or Slo(math.inf, math.inf),
        )
        return out

    def _submit(self, k: int) -> None:
        inp, out = self.arrivals.lengths[k]
        params = self._params.get(out)
        if params is None:
            params = self._params[out] = SamplingParams(max_tokens=out, ignore_eos=True)
        r = Request([TOKEN] * inp, params)
        r.arrival = self.now
        if k == self.arrivals.warmup:
            self.first_counted = r.id
        self.requests.append(r)
        self.sched.submit(r)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _meets(r: Request, slo: Slo) -> bool:
    t = r.times
    ttft = t["first_token"] - r.arrival
    n = len(r.output)
    return ttft <= slo.ttft_s and (n < 2 or (t["finished"] - t["first_token"]) / (n - 1) <= slo.tpot_s)


def _result(r: Request) -> RequestResult:
    """What a client would have seen, and the server's breakdown (``serving.server.latency``);
    a request still running when a simulation gave up counts as a miss."""
    t = r.times
    if not r.finished:
        return RequestResult(len(r.prompt), r.params.max_tokens, sent=r.arrival, error="UNFINISHED")
    first, last, n = t["first_token"], t["finished"], len(r.output)
    times = np.linspace(first, last, n).tolist() if n > 1 else [first]
    server = {
        "queue_s": t.get("prefill_start", r.arrival) - r.arrival,
        "prefill_s": t.get("prefill_end", first) - t.get("prefill_start", r.arrival),
        "transfer_s": r.transfer_s,
        "transfer_bytes": float(r.transfer_bytes),
        "decode_queue_s": max(0.0, t.get("admitted", t.get("prefill_end", first)) - t.get("prefill_end", first)),
        "preemptions": float(r.preemptions),
    }
    return RequestResult(
        len(r.prompt), n, sent=r.arrival, token_times=times, finish_reason=r.finish_reason or "", server=server
    )


def simulate(system: System, arrivals: Arrivals, slo: Slo | None = None, give_up_below: float = 0.0) -> Outcome:
    """One point. With ``give_up_below``, stops as soon as attainment can no longer reach it."""
    return Simulation(system, arrivals, slo, give_up_below).run()


def sweep(system: System, w: Workload, rates: Sequence[float]) -> list[Outcome]:
    """The points ``jdisagg.bench run`` would measure at ``rates``."""
    return [simulate(system, p, w.slo) for p in points(w, rates, system.preset.max_seq_len)]


def sweep_goodput(outcomes: Sequence[Outcome], target: float) -> stats.Goodput:
    return stats.goodput([o.rate for o in outcomes], [o.attainment for o in outcomes], target)
