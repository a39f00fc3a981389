"""The KV transfer interface: what a decode instance calls to get prefixes into its layout.

One implementation per way the bytes move: ``reshard.InProcess`` (device to device, both
instances in this process). A backend between processes implements the same verb.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

from jdisagg.runtime.prefill import Prefix


class KVTransfer(abc.ABC):
    """Moves prefixes from where prefill left them into a decode instance's layout."""

    @abc.abstractmethod
    def pull(self, prefixes: Sequence[Prefix], dst: NamedSharding) -> list[tuple[jax.Array, jax.Array]]:
        """Each prefix's k and v [L, T, K, H] laid out as ``dst``, on the decode devices; returns
        once they are there, so the time a caller measures around it is the transfer's."""
