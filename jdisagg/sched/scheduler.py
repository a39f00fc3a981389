"""Scheduling policy in plain Python: requests, the prefill queue, decode slots and pages.

Nothing here touches a device; the runners execute what these classes decide.

A request's life::

    WAITING --prefill--> PREFILLED (prefix KV held on the prefill mesh)
            --pull-----> RUNNING (KV in decode pages; one token per decode step)
            --stop-----> FINISHED
    RUNNING --preempted (pages ran out)--> WAITING, to be prefilled again over
            prompt + output[:-1]; tokens already produced are kept.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import queue
import time

from jdisagg.sched.pages import PageAllocator, pages_for
from jdisagg.sched.params import SamplingParams


class State(enum.Enum):
    WAITING = "waiting"
    PREFILLED = "prefilled"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)  # jdisagg.sampling.Logprob per output token
    state: State = State.WAITING
    finish_reason: str | None = None
    prefix: object = None  # jdisagg.prefill.Prefix while PREFILLED
    prefill_instance: int = 0  # which prefill instance holds the prefix
    pages: list[int] = dataclasses.field(default_factory=list)
    preemptions: int = 0
    cancelled: bool = False
    error: str | None = None  # set when the engine failed while holding the request
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # event name -> perf_counter()
    transfer_s: float = 0.0
    transfer_bytes: int = 0
    # Streaming consumers read (new token ids, finished?) tuples from here; None when nobody streams.
    events: queue.SimpleQueue | None = None

    def append(self, token: int, logprob) -> None:
        self.output.append(token)
        if self.params.logprobs:
            self.logprobs.append(logprob)

    def mark(self, event: str) -> None:
        """Records the first time ``event`` happens (prefill_start, first_token, admitted, finished)."""
        self.times.setdefault(event, time.perf_counter())

    def emit(self, tokens: list[int]) -> None:
        if self.events is not None:
            self.events.put((tokens, self.state is State.FINISHED))

    @property
    def prefill_tokens(self) -> list[int]:
        """What prefill must process: the prompt, plus all but the last output token after a preemption."""
        return self.prompt + self.output[:-1]

    @property
    def position(self) -> int:
        """Position of the next decode input (the last output token)."""
        return len(self.prompt) + len(self.output) - 1


class PrefillQueue:
    """FCFS queue of waiting requests, cut into batches that fit a token budget."""

    def __init__(self):
        self._queue: collections.deque[Request] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, request: Request, front: bool = False) -> None:
        request.state = State.WAITING
        (self._queue.appendleft if front else self._queue.append)(request)

    def remove(self, request: Request) -> bool:
        try:
            self._queue.remove(request)
            return True
        except ValueError:
            return False

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def drain(self) -> list[Request]:
        out = list(self._queue)
        self._queue.clear()
        return out

    def next_batch(self, max_prompts: int, token_budget: int) -> list[Request]:
        """The longest FCFS prefix of the queue that packs into one prefill call: at most
        ``max_prompts`` prompts of at most ``token_budget`` tokens together; a longer prompt
        at the head runs alone."""
        batch: list[Request] = []
        tokens = 0
        for request in self._queue:
            n = len(request.prefill_tokens)
            if batch and (len(batch) == max_prompts or tokens + n > token_budget):
                break
            batch.append(request)
            tokens += n
        for _ in batch:
            self._queue.popleft()
        return batch


class DecodeSlots:
    """The requests one decode instance runs, and the pages they hold."""

    def __init__(self, n_pages: int, page_size: int, max_batch: int, max_seq_len: int):
        self.allocator = PageAllocator(n_pages)
        self.page_size, self.max_batch, self.max_seq_len = page_size, max_batch, max_seq_len
        self.running: list[Request] = []  # in admission order: the last is the youngest
        self.admitted = 0  # requests taken so far
        # Chunked prefill: the request whose prompt is being prefilled, and how far it got.
        self.chunking: Request | None = None
        self.chunk_done = 0

    def __len__(self) -> int:
        return len(self.running)

    def can_admit(self, request: Request) -> bool:
        """Whether a batch slot and pages for the request's prefix plus one token are free."""
        needed = pages_for(request.position + 1, self.page_size)
        return len(self.running) < self.max_batch and needed <= self.allocator.num_free

    def try_admit(self, request: Request) -> bool:
        """Takes the request if ``can_admit``; allocates its pages."""
        if not self.can_admit(request):
            return False
        request.pages = self.allocator.allocate(pages_for(request.position + 1, self.page_size))
        request.state = State.RUNNING
        self.running.append(request)
        self.admitted += 1
        return True

    def reserve_prompt(self, request: Request) -> bool:
        """Chunked prefill: takes pages for the request's whole prefill plus one token."""
        if len(self.running) >= self.max_batch:
            return False
        pages = self.allocator.allocate(pages_for(len(request.prefill_tokens) + 1, self.page_size))
        if pages is None:
            return False
        request.pages, request.state = pages, State.PREFILLED
        self.chunking, self.chunk_done = request, 0
        return True

    def adopt(self, request: Request) -> None:
        """Chunked prefill: the prompt is in; the request decodes from now on."""
        request.state = State.RUNNING
        self.running.append(request)
        self.admitted += 1

    def drop_chunking(self) -> None:
        self.allocator.free(self.chunking.pages)
        self.chunking.pages = []
        self.chunking = None

    def release(self, request: Request) -> None:
        self.allocator.free(request.pages)
        request.pages = []
        self.running.remove(request)

    def reserve_next(self) -> list[Request]:
        """Makes sure every running request has a page for its next position.

        When pages run out, the youngest requests are preempted (their pages freed) until
        the rest fit; returns the preempted requests, which the caller re-queues.
        """
        preempted = []
        for request in list(self.running):
            if request not in self.running:
                continue  # preempted in this loop
            while pages_for(request.position + 1, self.page_size) > len(request.pages):
                page = self.allocator.allocate(1)
                if page is not None:
                    request.pages += page
                    continue
                victim = self.running[-1]
                self.release(victim)
                victim.preemptions += 1
                preempted.append(victim)
                if victim is request:
                    break
        return preempted


def stop_reason(request: Request, eos_ids: tuple[int, ...], max_seq_len: int) -> str | None:
    """Why the request stops after its latest token, or None to go on (stop strings are the caller's)."""
    token, p = request.output[-1], request.params
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids):
        return "stop"
    if len(request.output) >= p.max_tokens or request.position + 1 >= max_seq_len:
        return "length"
    return None
