"""What the router between instances owns: which decode instance pulls each prefix, and (with
instances in processes of their own) which prefill instance takes each request.

Least-loaded routing, in one process: a decode instance pulls a prefix only if no other
instance that could take it (it takes that prefill instance's prefixes, and has a slot and
pages for it) runs fewer requests. Prefill needs no routing there: the instances take FCFS
batches from one queue as they have room, which keeps every prefill instance busy while
work waits.

Across processes (``jdisagg.serving.router``) each prefill instance has its own queue, so
the router sends a request to the prefill instance with the fewest prompt tokens waiting
and prefix tokens held (``pick_prefill``), and, once it is prefilled, to the decode instance
with the fewest requests whose pool can hold it (``pick_decode``; ties: more free pages).
The same rule as in one process: the fewest requests wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

from jdisagg.sched.decode import DecodeSlots
from jdisagg.sched.pages import pages_for
from jdisagg.sched.request import Request


def routes_to(index: int, request: Request, decode: Sequence[DecodeSlots]) -> bool:
    """Whether decode instance ``index`` should pull ``request``: it can take it and no
    instance that could runs fewer requests (only those that run fewer are asked)."""
    d = decode[index]
    if not (d.takes(request.prefill_instance) and d.can_admit(request)):
        return False
    fewer = (o for o in decode if len(o) < len(d))
    return not any(o.takes(request.prefill_instance) and o.can_admit(request) for o in fewer)


# ---- across processes: load reports instead of the instances' own objects ----------------


@dataclasses.dataclass(frozen=True)
class PrefillLoad:
    """A prefill instance as a router in front of processes sees it."""

    waiting_tokens: int  # prompt tokens sent to it and not yet prefilled
    held_tokens: int  # prefix tokens it holds for decode to pull (its last load report)


@dataclasses.dataclass(frozen=True)
class DecodeLoad:
    """A decode instance as a router in front of processes sees it."""

    requests: int  # requests sent to it and not finished
    free_pages: int  # its last load report
    total_pages: int
    page_size: int


def least_loaded(loads: Mapping[Hashable, tuple]) -> Hashable | None:
    """The key with the smallest load (ties: the smallest key); None if there is none."""
    return min(loads, key=lambda k: (loads[k], k)) if loads else None


def pick_prefill(loads: Mapping[Hashable, PrefillLoad]) -> Hashable | None:
    """The prefill instance with the fewest prompt tokens waiting and prefix tokens held."""
    return least_loaded({k: (p.waiting_tokens + p.held_tokens,) for k, p in loads.items()})


def pick_decode(loads: Mapping[Hashable, DecodeLoad], tokens: int) -> Hashable | None:
    """The decode instance with the fewest requests (ties: the most free pages) among those
    whose pool can ever hold ``tokens`` positions plus the next one; None if none can."""
    fits = {
        k: (d.requests, -d.free_pages) for k, d in loads.items() if pages_for(tokens + 1, d.page_size) <= d.total_pages
    }
    return least_loaded(fits)
