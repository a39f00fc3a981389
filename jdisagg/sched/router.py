"""What the router between instances owns: which decode instance pulls each prefix.

Least-loaded routing: a decode instance pulls a prefix only if no other instance that could
take it (it takes that prefill instance's prefixes, and has a slot and pages for it) runs
fewer requests. Prefill needs no routing in one process: the instances take FCFS batches
from one queue as they have room, which keeps every prefill instance busy while work waits.
"""

from __future__ import annotations

from collections.abc import Sequence

from jdisagg.sched.decode import DecodeSlots
from jdisagg.sched.request import Request


def candidates(request: Request, decode: Sequence[DecodeSlots]) -> list[int]:
    """The decode instances that could take ``request`` now."""
    return [i for i, d in enumerate(decode) if d.takes(request.prefill_instance) and d.can_admit(request)]


def routes_to(index: int, request: Request, decode: Sequence[DecodeSlots]) -> bool:
    """Whether decode instance ``index`` should pull ``request``: it can take it and no
    instance that could runs fewer requests."""
    loads = [len(decode[i]) for i in candidates(request, decode)]
    d = decode[index]
    return d.takes(request.prefill_instance) and d.can_admit(request) and len(d) <= min(loads)
