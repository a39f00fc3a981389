"""The scheduling policy of one process's instances, as verbs that follow the
schedule -> execute -> update loop of each instance.

The drivers (``jdisagg.runtime.workers`` on devices, the planner's simulator on a virtual
clock) call, per instance::

    prefill i:  batch = take_prefill(i)      -> run the prompts   -> prefilled(i, batch, prefixes)
    decode d:   pulls = take_pulls(d)        -> move their KV     -> pulled(d, pulls, seconds)
                batch = take_step(d)         -> decode step(s)    -> sampled(d, batch, tokens, logprobs)
    chunked d:  step = take_chunk_step(d)    -> one mixed step    -> chunk_sampled(d, step, tokens, logprobs)

Each ``take_*`` returns a small value naming the requests and their inputs (read under the
lock); the runner executes it; the matching update verb takes it back with the results.

A decode instance may run several steps per device call (``DecodeSpec.steps``; a pipelined
instance does, so its stages stay busy): ``take_step`` then says how many tokens each row may
produce (``DecodeBatch.steps``: fewer near its ``max_tokens`` or ``max_seq_len``) with pages
held for all of them, and ``sampled`` gets each row's tokens in order. Stop tokens and stop
strings are found there, after the fact: a row that stops keeps the tokens up to the one that
stopped it and drops the rest (the call wrote their KV into pages the row frees now).

and any thread calls ``submit``, ``cancel`` and ``fail``. Every verb is atomic (one lock),
and the runners never decide anything: what to run, where, and when a request ends is
decided here. ``on_change`` is called after every verb that changed something, so idle
workers can sleep until there is work.

What each part owns (so the same parts can sit in different processes): the FCFS queue
(``PrefillQueue``), each prefill instance's buffer of prefixes (``PrefillBuffer``:
back-pressure), each decode instance's slots and pages (``DecodeSlots``: admission,
preemption of the youngest), and the routing between them (``router``).

One instance per process (``jdisagg.serving.instance``): a prefill process runs a Scheduler
with one prefill and no decode instance, and ``hand_off`` ends a request there once a decode
process pulled its prefix; a decode process runs one with no prefill and one decode
instance, and ``hold`` gives it a prefix held by another process to pull (a preempted
request lands in its queue, which that process hands back to the router). The router in
front of them picks instances with ``router.pick_prefill`` / ``router.pick_decode``.

Cancellation frees a request's queue slot, prefix and pages at once (memory a device call
in flight is still using stays referenced by that call until it returns) and ends its
stream with finish reason "cancelled"; the verb that later sees the request skips it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from jdisagg.sched import router
from jdisagg.sched.decode import DecodeSlots
from jdisagg.sched.params import Logprob, SamplingParams
from jdisagg.sched.prefill import PrefillBuffer, PrefillQueue
from jdisagg.sched.request import Prefix, Request, State, append_token, emit


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
    """What the scheduler knows of a prefill instance."""

    max_prompts: int  # prompts per call
    token_budget: int  # prompt tokens per call; a longer prompt runs alone
    buffer_tokens: int  # prefix tokens held for decode before prefill pauses


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What the scheduler knows of a decode (or colocated, or chunked) instance."""

    n_pages: int  # the pool, null page included
    page_size: int
    max_batch: int
    takes_from: int | None = None  # colocated: its own prefill instance; None: any
    chunk_tokens: int = 0  # > 0: a chunked-prefill instance, prefilling this many tokens per step
    steps: int = 1  # decode steps per device call: tokens per row per call, at most


# What one device call runs, read under the lock (a cancel from another thread may change the
# requests meanwhile; the update verb skips the ones that finished).


@dataclasses.dataclass
class PrefillBatch:
    requests: list[Request]
    prompts: list[list[int]]  # what each must prefill (prompt, plus output after a preemption)
    params: list[SamplingParams]


@dataclasses.dataclass
class Pull:
    request: Request
    prefix: object  # the prefill runner's Prefix: what to move
    pages: list[int]  # decode pages reserved for it, in position order


@dataclasses.dataclass
class DecodeBatch:
    requests: list[Request]
    tokens: list[int]  # each row's last token
    positions: list[int]  # where it goes
    page_tables: list[list[int]]
    params: list[SamplingParams]
    steps: list[int]  # tokens each row's call produces (its pages are held); 1 per step-at-a-time instance

    @classmethod
    def of(cls, slots: DecodeSlots) -> DecodeBatch:
        rows = slots.running
        return cls(
            list(rows),
            [r.output[-1] for r in rows],
            [r.position for r in rows],
            [list(r.pages) for r in rows],
            [r.params for r in rows],
            [slots.call_tokens(r) for r in rows],
        )


@dataclasses.dataclass
class ChunkStep:
    """A chunked instance's next step: decode rows plus (maybe) the next piece of one prompt."""

    batch: DecodeBatch
    chunk: Request | None = None
    start: int = 0  # the piece's first prompt position
    piece: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)  # the prompt's pages
    params: SamplingParams | None = None


@dataclasses.dataclass(frozen=True)
class Load:
    """What one process's instances hold, for metrics and (later) a router's load reports."""

    queued: int  # requests waiting for prefill
    prefilled: list[int]  # per prefill instance: prefixes held for decode
    held_tokens: list[int]  # per prefill instance: prefix tokens held
    running: list[int]  # per decode instance: requests holding a slot
    pages_used: list[int]
    pages_total: list[int]


class Scheduler:
    """The prefill queue, prefill buffers, decode slots and routing of one process."""

    def __init__(
        self,
        prefill: Sequence[PrefillSpec],
        decode: Sequence[DecodeSpec],
        *,
        max_seq_len: int,
        eos_ids: tuple[int, ...],
        clock: Callable[[], float] = time.perf_counter,
        on_change: Callable[[], None] | None = None,
    ):
        self.max_seq_len, self.eos_ids, self.clock = max_seq_len, tuple(eos_ids), clock
        self.queue = PrefillQueue()
        self.prefill = [PrefillBuffer(i, s.max_prompts, s.token_budget, s.buffer_tokens) for i, s in enumerate(prefill)]
        self.decode = [
            DecodeSlots(
                s.n_pages, s.page_size, s.max_batch, max_seq_len=max_seq_len, takes_from=s.takes_from, steps=s.steps
            )
            for s in decode
        ]
        self.chunk_tokens = [s.chunk_tokens for s in decode]
        self.held: list[Request] = []  # prefixes held for decode, FCFS across prefill instances
        self.lock = threading.RLock()
        self.on_change = on_change or (lambda: None)

    # ---- intake ------------------------------------------------------------------------

    def submit(self, r: Request) -> None:
        with self.lock:
            if r.arrival is None:
                r.arrival = self.clock()
            self.queue.add(r)
        self.on_change()

    def cancel(self, r: Request) -> None:
        """Ends ``r`` now with "cancelled", freeing what it holds (see the module docstring)."""
        with self.lock:
            if r.finished:
                return
            r.cancelled = True
            self._free(r)
            self._finish(r, "cancelled")
        self.on_change()

    def fail(self, requests: Sequence[Request], error: str) -> None:
        """Ends ``requests`` with ``error`` (an instance failed while running them)."""
        with self.lock:
            for r in requests:
                if not r.finished:
                    r.error = error
                    self._free(r)
                    self._finish(r, "error")
        self.on_change()

    def fail_all(self, error: str) -> None:
        """Ends every request held anywhere with ``error``; nothing is left hanging."""
        with self.lock:
            held = list(self.queue)
            held += [r for b in self.prefill for r in b.running] + self.held
            held += [r for d in self.decode for r in (*d.running, *d.pulling, *[d.chunking] * bool(d.chunking))]
        self.fail(held, error)

    def load(self) -> Load:
        with self.lock:
            return Load(
                queued=len(self.queue),
                prefilled=[b.held for b in self.prefill],
                held_tokens=[b.held_tokens for b in self.prefill],
                running=[len(d) for d in self.decode],
                pages_used=[d.pages_used for d in self.decode],
                pages_total=[d.allocator.capacity for d in self.decode],
            )

    def idle(self) -> bool:
        """Nothing queued, held or running."""
        with self.lock:
            return not (len(self.queue) or self.held or any(b.running for b in self.prefill) or any(self.decode))

    # ---- prefill -----------------------------------------------------------------------

    def take_prefill(self, i: int) -> PrefillBatch | None:
        """The next FCFS batch for prefill instance ``i``; None while its buffer is full or
        nothing waits."""
        with self.lock:
            b = self.prefill[i]
            if not b.has_room or b.running:
                return None
            batch = self.queue.next_batch(b.max_prompts, b.token_budget)
            if not batch:
                return None
            for r in batch:
                r.state, r.prefill_instance = State.PREFILLING, i
                self._mark(r, "prefill_start")
            b.running = list(batch)
            return PrefillBatch(batch, [r.prefill_tokens for r in batch], [r.params for r in batch])

    def prefilled(self, i: int, batch: PrefillBatch, prefixes: Sequence[Prefix]) -> None:
        """Prefill instance ``i`` ran ``batch``: first tokens out, prefixes held for decode."""
        with self.lock:
            b = self.prefill[i]
            b.running = []
            for r, prefix in zip(batch.requests, prefixes, strict=True):
                if r.finished:  # cancelled or failed meanwhile
                    continue
                self._mark(r, "prefill_end")
                if not r.output:  # a first prefill; after a preemption the output is already there
                    self._mark(r, "first_token")
                    if self._take_tokens(r, [prefix.first_token], [prefix.first_logprob]):
                        continue
                b.hold(r, prefix)
                self.held.append(r)
        self.on_change()

    # ---- across processes (a prefill or decode instance in a process of its own) ----------

    def hold(self, r: Request, prefix: Prefix) -> None:
        """``r`` was prefilled in another process, which holds ``prefix``: this process's decode
        instances pull it as they pull their own prefill instances' (``take_pulls``)."""
        with self.lock:
            if r.arrival is None:
                r.arrival = self.clock()
            r.prefix, r.state, r.prefill_instance = prefix, State.PREFILLED, None
            self.held.append(r)
        self.on_change()

    def hand_off(self, r: Request) -> None:
        """A decode instance in another process has pulled ``r``'s prefix (or its lease ended):
        its buffer space is free and the request goes on elsewhere, so it leaves this process
        without a finish reason or an update."""
        with self.lock:
            if r.finished:
                return
            self._free(r)
            r.state = State.FINISHED
        self.on_change()

    # ---- decode ------------------------------------------------------------------------

    def take_pulls(self, d: int) -> list[Pull]:
        """Prefixes decode instance ``d`` pulls now, FCFS among those it takes, while it has a
        slot and pages and no instance that could take the prefix runs fewer requests. Their
        pages are reserved."""
        with self.lock:
            pulls = []
            for r in [r for r in self.held if self.decode[d].takes(r.prefill_instance)]:
                if not router.routes_to(d, r, self.decode):
                    break
                self.held.remove(r)
                self.decode[d].admit(r)
                r.decode_instance = d
                self._mark(r, "admitted")
                pulls.append(Pull(r, r.prefix, list(r.pages)))
            return pulls

    def pulled(self, d: int, pulls: Sequence[Pull], seconds: float) -> None:
        """The KV of ``pulls`` is in decode instance ``d``'s pages (moving it took ``seconds``):
        their prefixes are released on the prefill side and they decode from the next step."""
        with self.lock:
            for pull in pulls:
                r = pull.request
                if r.finished:
                    continue
                r.transfer_s += seconds
                r.transfer_bytes += pull.prefix.nbytes
                if r.prefill_instance is not None:  # None: held by another process (``hold``)
                    self.prefill[r.prefill_instance].release(r)
                else:
                    r.prefix = None
                self.decode[d].start(r)
        self.on_change()

    def take_step(self, d: int) -> DecodeBatch | None:
        """The rows of decode instance ``d``'s next call, each with pages for the tokens it
        produces (the youngest are preempted and re-queued when pages run out); None without rows."""
        with self.lock:
            slots = self.decode[d]
            self._preempt(slots)
            return DecodeBatch.of(slots) if slots.running else None

    def sampled(
        self,
        d: int,
        batch: DecodeBatch,
        tokens: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[Logprob | None]],
    ) -> None:
        """Decode instance ``d``'s call gave each row its ``tokens`` (``batch.steps`` of them, in
        order) and their ``logprobs``; a row that stops drops the tokens after the stop."""
        with self.lock:
            for r, row_tokens, row_logprobs in zip(batch.requests, tokens, logprobs, strict=False):
                if not r.finished and self._take_tokens(r, row_tokens, row_logprobs):
                    self.decode[d].release(r)
        self.on_change()

    # ---- chunked prefill ---------------------------------------------------------------

    def take_chunk_step(self, d: int) -> ChunkStep | None:
        """A chunked instance's next step: its rows, and the next ``chunk_tokens`` of the prompt
        it is prefilling (taking the queue's head when it has none and pages allow); None
        when there is nothing to run."""
        with self.lock:
            slots = self.decode[d]
            head = self.queue.peek()
            if slots.chunking is None and head is not None and slots.reserve_prompt(head):
                self.queue.remove(head)
                head.decode_instance = d
                self._mark(head, "prefill_start")
            self._preempt(slots)
            r = slots.chunking
            if r is None and not slots.running:
                return None
            step = ChunkStep(DecodeBatch.of(slots))
            if r is not None:
                start = slots.chunk_done
                piece = r.prefill_tokens[start : start + self.chunk_tokens[d]]
                step.chunk, step.start, step.piece, step.pages, step.params = r, start, piece, list(r.pages), r.params
            return step

    def chunk_sampled(self, d: int, step: ChunkStep, tokens: Sequence[int], logprobs: Sequence[Logprob | None]) -> None:
        """The mixed step gave one token per row, then (last) the token after the chunk."""
        n = len(step.batch.requests)
        self.sampled(d, step.batch, [[t] for t in tokens[:n]], [[lp] for lp in logprobs[:n]])
        r = step.chunk
        if r is None:
            return
        with self.lock:
            slots = self.decode[d]
            if r.finished or slots.chunking is not r:
                return
            slots.chunk_done += len(step.piece)
            if slots.chunk_done < len(r.prefill_tokens):
                return
            slots.chunking = None  # the prompt is in; decode from here
            self._mark(r, "prefill_end")
            self._mark(r, "admitted")
            slots.start(r)
            if not r.output:
                self._mark(r, "first_token")
                if self._take_tokens(r, [tokens[-1]], [logprobs[-1]]):
                    slots.release(r)
        self.on_change()

    # ---- updates -----------------------------------------------------------------------

    def _take_tokens(self, r: Request, tokens: Sequence[int], logprobs: Sequence[Logprob | None]) -> bool:
        """Appends tokens in order until one stops the request (the rest are dropped), streams
        those taken in one update, and finishes the request if it stopped; True if it did."""
        reason, taken = None, 0
        for token, logprob in zip(tokens, logprobs, strict=True):
            taken += 1
            reason = append_token(r, token, logprob, self.eos_ids, self.max_seq_len)
            if reason:
                r.finish_reason, r.state = reason, State.FINISHED
                self._mark(r, "finished")
                break
        self._emit(r, list(tokens[:taken]), list(logprobs[:taken]) if r.params.logprobs else [])
        return reason is not None

    def _preempt(self, slots: DecodeSlots) -> None:
        """Reserves every running request's next page; the preempted go back to the queue's front."""
        for victim in reversed(slots.reserve_next()):
            self.queue.add(victim, front=True)

    def _free(self, r: Request) -> None:
        """Takes ``r`` out of wherever it is and frees what it holds."""
        if r.state is State.WAITING:
            self.queue.remove(r)
        elif r.state is State.PREFILLED:
            self.held.remove(r)
        if r.prefill_instance is not None:
            b = self.prefill[r.prefill_instance]
            if r in b.running:
                b.running.remove(r)
            b.release(r)
        if r.decode_instance is not None:
            self.decode[r.decode_instance].release(r)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.state = reason, State.FINISHED
        self._mark(r, "finished")
        self._emit(r, [], [])

    def _emit(self, r: Request, tokens: list[int], logprobs: list[Logprob]) -> None:
        emit(r, tokens, logprobs)

    def _mark(self, r: Request, event: str) -> None:
        r.times.setdefault(event, self.clock())
