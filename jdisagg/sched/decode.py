"""What a decode instance owns: its batch slots and its page pool, admission and preemption.

An instance may run several decode steps per device call (``steps``, a pipelined instance's
``steps_per_call``): every page a request's next call writes is held before the call, so
admission leaves room for the running requests' next calls, not just their next tokens.
"""

from __future__ import annotations

from jdisagg.sched.pages import PageAllocator, pages_for
from jdisagg.sched.request import Request, State


class DecodeSlots:
    """The requests one decode instance runs, and the pages they hold."""

    def __init__(
        self,
        n_pages: int,
        page_size: int,
        max_batch: int,
        *,
        max_seq_len: int,
        takes_from: int | None = None,
        steps: int = 1,
    ):
        self.allocator = PageAllocator(n_pages)
        self.page_size, self.max_batch = page_size, max_batch
        self.max_seq_len, self.steps = max_seq_len, steps
        # Colocated: the prefill instance on the same devices (a replica decodes only what it
        # prefilled); None: any prefill instance's prefixes.
        self.takes_from = takes_from
        self.running: list[Request] = []  # in admission order: the last is the youngest
        self.pulling: list[Request] = []  # admitted, KV on its way
        self.admitted = 0  # requests taken so far
        # Chunked prefill: the request whose prompt is being prefilled, and how far it got.
        self.chunking: Request | None = None
        self.chunk_done = 0

    def __len__(self) -> int:
        """Requests holding a slot: running, and admitted with their KV on the way."""
        return len(self.running) + len(self.pulling)

    def takes(self, prefill_index: int | None) -> bool:
        return self.takes_from in (None, prefill_index)

    @property
    def pages_used(self) -> int:
        return self.allocator.capacity - self.allocator.num_free

    def call_tokens(self, request: Request) -> int:
        """Tokens the request's next device call produces: ``steps``, or fewer where its
        ``max_tokens`` or ``max_seq_len`` comes first (a stop token may still end it sooner)."""
        left = min(request.params.max_tokens - len(request.output), self.max_seq_len - 1 - request.position)
        return max(1, min(self.steps, left))

    def _call_pages(self, request: Request) -> int:
        """Pages the request holds once its next call's positions have pages."""
        return pages_for(request.position + self.call_tokens(request), self.page_size)

    def _next_step_pages(self) -> int:
        """Pages the running requests still need for their next calls (``_call_pages`` less
        what each holds, inlined: admission asks this for every prefix it considers, and the
        planner's simulations spend most of their time here)."""
        z, steps, last = self.page_size, self.steps, self.max_seq_len - 1
        needed = 0
        for r in self.running:
            done = len(r.output)
            position = len(r.prompt) + done - 1
            tokens = max(1, min(steps, r.params.max_tokens - done, last - position))
            more = -(-(position + tokens) // z) - len(r.pages)
            if more > 0:
                needed += more
        return needed

    def can_admit(self, request: Request) -> bool:
        """Whether a batch slot and pages for the request's prefix plus its first call's
        tokens are free, after the running requests' next calls (so admitting never forces a
        preemption)."""
        needed = self._call_pages(request) + self._next_step_pages()
        return len(self) < self.max_batch and needed <= self.allocator.num_free

    def admit(self, request: Request) -> None:
        """Takes the request (``can_admit`` must hold): allocates its pages; its KV is to be pulled."""
        request.pages = self.allocator.allocate(self._call_pages(request))
        request.state = State.PULLING
        self.pulling.append(request)
        self.admitted += 1

    def start(self, request: Request) -> None:
        """The request's KV is in its pages: it decodes from the next step on."""
        if request in self.pulling:
            self.pulling.remove(request)
        request.state = State.RUNNING
        self.running.append(request)

    def reserve_prompt(self, request: Request) -> bool:
        """Chunked prefill: takes pages for the request's whole prefill plus one token."""
        if len(self) >= self.max_batch:
            return False
        needed = pages_for(len(request.prefill_tokens) + 1, self.page_size) + self._next_step_pages()
        if needed > self.allocator.num_free:
            return False
        request.pages = self.allocator.allocate(pages_for(len(request.prefill_tokens) + 1, self.page_size))
        request.state = State.PREFILLING
        self.chunking, self.chunk_done = request, 0
        self.admitted += 1
        return True

    def release(self, request: Request) -> None:
        """Frees the request's slot and pages, wherever it is on this instance."""
        self.allocator.free(request.pages)
        request.pages = []
        if request in self.running:
            self.running.remove(request)
        elif request in self.pulling:
            self.pulling.remove(request)
        elif request is self.chunking:
            self.chunking = None

    def reserve_next(self) -> list[Request]:
        """Makes sure every running request has pages for its next call's positions.

        When pages run out, the youngest requests are preempted (their pages freed) until
        the rest fit; returns the preempted requests, which the caller re-queues.
        """
        preempted = []
        for request in list(self.running):
            if request not in self.running:
                continue  # preempted in this loop
            while self._call_pages(request) > len(request.pages):
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
