"""A request, its states, and what it streams to whoever waits on it.

A request's life::

    WAITING --take_prefill--> PREFILLING --prefilled--> PREFILLED (prefix KV held by the
            prefill instance) --take_pulls--> PULLING (pages reserved on a decode instance,
            KV moving) --pulled--> RUNNING (one token per decode step) --stop--> FINISHED
    RUNNING --preempted (pages ran out)--> WAITING, to be prefilled again over
            prompt + output[:-1]; tokens already produced are kept.
    any state --cancel / failure--> FINISHED ("cancelled" / "error")

A chunked-prefill instance takes a WAITING request straight to PREFILLING on its own pages
and from there to RUNNING.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable
from typing import Any, Protocol

from jdisagg.sched.params import Logprob, SamplingParams


class State(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    PREFILLED = "prefilled"
    PULLING = "pulling"
    RUNNING = "running"
    FINISHED = "finished"


# Why a request ended (FinalInfo.finish_reason; jdisagg_requests_total{finish_reason}).
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class TextSink(Protocol):
    """A request's output text (``jdisagg.text.output.TextOutput``): fed every token, it says
    when a stop string completed and hands out the text that is safe to send."""

    def push(self, token: int, shown: bool) -> bool: ...  # True: a stop string completed
    def take(self) -> str: ...  # text safe to send now
    def finish(self) -> str: ...  # the rest, at the end


class Prefix(Protocol):
    """What a prefill call hands the scheduler for one request (``jdisagg.runtime.prefill.Prefix``):
    the first token and how many KV positions the prefill instance now holds for it."""

    first_token: int
    first_logprob: Logprob
    held_tokens: int
    nbytes: int


@dataclasses.dataclass
class Output:
    """One update of a request's stream: the tokens since the last update and the text they
    complete (never text that a stop string may still cut)."""

    tokens: list[int]
    text: str
    logprobs: list[Logprob]  # one per token when SamplingParams.logprobs > 0, else empty
    finished: bool


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Logprob] = dataclasses.field(default_factory=list)  # per output token, when asked for
    state: State = State.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why a failed request failed
    error_code: str | None = None  # the gRPC status name a failed request ends with (None: INTERNAL)
    cancelled: bool = False
    preemptions: int = 0
    # Where it is: the prefill instance holding its prefix, the decode instance running it.
    prefix: Any = None  # Prefix, while PREFILLED or PULLING
    prefill_instance: int | None = None
    decode_instance: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)  # decode pages, in position order
    # Clock times: arrival, and the first time each event happened (prefill_start,
    # prefill_end, first_token, admitted, finished).
    arrival: float | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    transfer_s: float = 0.0  # moving the KV from prefill to decode (until it was on the decode devices)
    transfer_bytes: int = 0
    text: TextSink | None = None  # None: no tokenizer (token ids only)
    listener: Callable[[Output], None] | None = None  # called on every update, from the worker that made it

    @property
    def prefill_tokens(self) -> list[int]:
        """What prefill must process: the prompt, plus all but the last output token after a preemption."""
        return self.prompt + self.output[:-1]

    @property
    def position(self) -> int:
        """Position of the next decode input (the last output token)."""
        return len(self.prompt) + len(self.output) - 1

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED


def stop_reason(request: Request, eos_ids: tuple[int, ...], max_seq_len: int) -> str | None:
    """Why the request stops after its latest token (a stop token or a length limit), or None
    to go on; stop strings are its text's to find."""
    if is_stop_token(request, request.output[-1], eos_ids):
        return "stop"
    if len(request.output) >= request.params.max_tokens or request.position + 1 >= max_seq_len:
        return "length"
    return None


def append_token(request: Request, token: int, logprob: Logprob | None, eos_ids: tuple[int, ...], max_seq_len: int):
    """Appends a sampled token to ``request`` (and its text); returns why it stops after it
    (a stop token, a length limit or a completed stop string), or None to go on. Every
    driver that receives tokens (the scheduler, a router in front of decode processes)
    decides a request's end with this, so they agree."""
    request.output.append(token)
    if request.params.logprobs:
        request.logprobs.append(logprob)
    reason = stop_reason(request, eos_ids, max_seq_len)
    if request.text is not None and request.text.push(token, shown=not is_stop_token(request, token, eos_ids)):
        reason = "stop"  # a stop string completed
    return reason


def emit(request: Request, tokens: list[int], logprobs: list[Logprob]) -> None:
    """Hands the request's listener its new tokens and the text they complete."""
    if request.listener is None and request.text is None:
        return
    text = ""
    if request.text is not None:
        text = request.text.finish() if request.finished else request.text.take()
    if request.listener is not None:
        request.listener(Output(tokens, text, logprobs, request.finished))


def is_stop_token(request: Request, token: int, eos_ids: tuple[int, ...]) -> bool:
    """A token that ends the request and is not part of its text."""
    p = request.params
    return token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids)
