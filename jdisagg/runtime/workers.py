"""Per-instance loop bodies: schedule (a scheduler verb) -> execute (a runner) -> update
(a scheduler verb). They decide nothing; the scheduling core does.

``loops(instances, scheduler)`` gives one ``(name, once)`` per instance of the preset:
``once()`` runs one iteration and returns False when the instance had nothing to do. The
offline engine calls them in turn from one thread; the server runs each in its own thread
(device work happens outside the scheduler's lock, so prefill and decode overlap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.instances import Instances
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.pages import pages_for
from jdisagg.sched.scheduler import Scheduler
from jdisagg.transfer.base import KVTransfer

Loop = tuple[str, Callable[[], bool]]


class Wakeup:
    """A counter of scheduler changes that idle workers sleep on (the scheduler's ``on_change``)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._count = 0

    def notify(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def count(self) -> int:
        return self._count

    def wait(self, seen: int, timeout: float) -> None:
        """Returns once something changed since ``seen`` (or after ``timeout``)."""
        with self._cond:
            self._cond.wait_for(lambda: self._count != seen, timeout)


def prefill_once(sched: Scheduler, i: int, runner: PrefillRunner) -> bool:
    """One prefill call on instance ``i``, if its buffer has room and work waits."""
    batch = sched.take_prefill(i)
    if batch is None:
        return False
    try:
        prefixes = runner.run(batch.prompts, batch.params)
    except Exception as e:  # the batch is in no queue now: end it here, then let the worker die
        sched.fail(batch.requests, f"prefill failed: {e}")
        raise
    sched.prefilled(i, batch, prefixes)
    return True


def decode_once(sched: Scheduler, d: int, runner: DecodeRunner, transfer: KVTransfer) -> bool:
    """Pulls the prefixes decode instance ``d`` has room for, then runs one step."""
    pulls = sched.take_pulls(d)
    if pulls:
        try:
            start = time.perf_counter()
            moved = transfer.pull([p.prefix for p in pulls], runner.prefix_sharding)
            seconds = time.perf_counter() - start
            for pull, (k, v) in zip(pulls, moved, strict=True):
                runner.insert(k, v, pull.pages[: pages_for(pull.prefix.length, runner.page_size)])
        except Exception as e:
            sched.fail([p.request for p in pulls], f"KV transfer failed: {e}")
            raise
        sched.pulled(d, pulls, seconds)
    return step_once(sched, d, runner) or bool(pulls)


def step_once(sched: Scheduler, d: int, runner: DecodeRunner, before: Callable | None = None) -> bool:
    """One decode call of instance ``d`` (``steps_per_call`` steps); False when it has no rows.
    ``before(batch)`` runs just before the device call (a multi-process instance tells its
    other processes)."""
    batch = sched.take_step(d)
    if batch is None:
        return False
    if before is not None:
        before(batch)
    try:
        sampled = runner.step(batch.tokens, batch.positions, batch.page_tables, batch.params, batch.steps)
    except Exception as e:
        sched.fail(batch.requests, f"decode failed: {e}")
        raise
    rows = sampled.tokens.T.tolist()  # [B][steps]
    tokens = [row[:n] for row, n in zip(rows, batch.steps, strict=False)]
    logprobs = [
        [sampled.at_step(k).logprob(i, p.logprobs) if p.logprobs else None for k in range(n)]
        for i, (p, n) in enumerate(zip(batch.params, batch.steps, strict=True))
    ]
    sched.sampled(d, batch, tokens, logprobs)
    return True


def chunked_once(sched: Scheduler, d: int, runner: DecodeRunner) -> bool:
    """One decode step of a chunked instance that also prefills the next chunk of a prompt."""
    step = sched.take_chunk_step(d)
    if step is None:
        return False
    b = step.batch
    try:
        if step.chunk is None:
            sampled = runner.step(b.tokens, b.positions, b.page_tables, b.params).at_step(0)  # one step per call
            rows = list(range(len(b.requests)))
            params = b.params
        else:
            sampled, chunk_row = runner.mixed(
                b.tokens, b.positions, b.page_tables, b.params, step.piece, step.start, step.pages, step.params
            )
            rows = [*range(len(b.requests)), chunk_row]
            params = [*b.params, step.params]
    except Exception as e:
        sched.fail([*b.requests, *[step.chunk] * (step.chunk is not None)], f"decode failed: {e}")
        raise
    tokens = [int(sampled.tokens[i]) for i in rows]
    logprobs = [sampled.logprob(i, p.logprobs) if p.logprobs else None for i, p in zip(rows, params, strict=True)]
    sched.chunk_sampled(d, step, tokens, logprobs)
    return True


def loops(instances: Instances, sched: Scheduler) -> list[Loop]:
    """One loop body per instance of the preset: disaggregated instances each get their own;
    a colocated instance runs prefill first (a waiting batch goes before the running
    requests' next step), then decode, on its one mesh."""
    out: list[Loop] = []
    t = instances.transfer
    for spec in instances.preset.instances:
        if spec.role == "prefill":
            out.append((spec.where, _bind(prefill_once, sched, spec.index, instances.prefill[spec.index])))
        elif spec.role == "decode":
            out.append((spec.where, _bind(decode_once, sched, spec.index, instances.decode[spec.index], t)))
        elif spec.role == "chunked":
            out.append((spec.where, _bind(chunked_once, sched, spec.index, instances.decode[spec.index])))
        else:  # colocated: instance i is prefill instance i and decode instance i
            p, d = instances.prefill[spec.index], instances.decode[spec.index]
            i = spec.index
            out.append((spec.where, lambda i=i, p=p, d=d: prefill_once(sched, i, p) or decode_once(sched, i, d, t)))
    return out


def _bind(fn, *args) -> Callable[[], bool]:
    return lambda: fn(*args)
