"""Leases on prefixes a prefill process holds for decode processes to pull.

A prefill instance in its own process keeps each finished prefix until a decode instance
has pulled it, the request is cancelled, or the lease expires, so no KV is stranded when a
decode process dies or never comes. Plain Python with an injected clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable


@dataclasses.dataclass
class Lease:
    key: Hashable
    holder: object  # what the lease keeps alive (a request)
    deadline: float


class Leases:
    """The leases one prefill process has granted, by key (the transfer uuid)."""

    def __init__(self, seconds: float, clock: Callable[[], float]):
        self.seconds, self.clock = seconds, clock
        self._leases: dict[Hashable, Lease] = {}
        self.granted = 0
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._leases

    def grant(self, key: Hashable, holder: object) -> Lease:
        lease = Lease(key, holder, self.clock() + self.seconds)
        self._leases[key] = lease
        self.granted += 1
        return lease

    def get(self, key: Hashable) -> Lease | None:
        return self._leases.get(key)

    def release(self, key: Hashable) -> Lease | None:
        """Ends the lease (pulled or cancelled); None if it had ended already."""
        return self._leases.pop(key, None)

    def expire(self) -> list[Lease]:
        """Ends and returns the leases whose deadline has passed."""
        now = self.clock()
        gone = [lease for lease in self._leases.values() if lease.deadline <= now]
        for lease in gone:
            del self._leases[lease.key]
        self.expired_total += len(gone)
        return gone
