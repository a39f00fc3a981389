"""What the prefill side owns: the FCFS queue of waiting requests (cut into batches that fit a
token budget) and each prefill instance's buffer of prefixes waiting to be pulled."""

from __future__ import annotations

import collections
import dataclasses

from jdisagg.sched.request import Request, State


class PrefillQueue:
    """FCFS queue of waiting requests, cut into batches that fit a token budget."""

    def __init__(self):
        self._queue: collections.deque[Request] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self):
        return iter(self._queue)

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

    def tokens(self) -> int:
        """Prompt tokens waiting (what a router compares across prefill instances)."""
        return sum(len(r.prefill_tokens) for r in self._queue)

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


@dataclasses.dataclass
class PrefillBuffer:
    """One prefill instance's budgets and the prefixes it holds until decode pulls them.

    When it holds ``buffer_tokens`` or more it takes no new batch (back-pressure), so bursts
    wait in prefill memory and the queue rather than in decode memory.
    """

    index: int
    max_prompts: int  # prompts per call
    token_budget: int  # prompt tokens per call (L_m); a longer prompt runs alone
    buffer_tokens: int  # prefix tokens held before prefill pauses
    held_tokens: int = 0
    held: int = 0  # prefixes
    running: list[Request] = dataclasses.field(default_factory=list)  # the batch in flight

    @property
    def has_room(self) -> bool:
        return self.held_tokens < self.buffer_tokens

    def hold(self, request: Request, prefix) -> None:
        request.prefix, request.state, request.prefill_instance = prefix, State.PREFILLED, self.index
        self.held_tokens += prefix.held_tokens
        self.held += 1

    def release(self, request: Request) -> None:
        """Forgets the request's prefix (pulled, cancelled or failed): its memory is free to reuse."""
        if request.prefix is not None:
            self.held_tokens -= request.prefix.held_tokens
            self.held -= 1
        request.prefix = None
