"""One instance as one multi-controller JAX program: process 0 of the instance decides, and
tells the other processes which device call comes next, so all of them issue the same
programs in the same order (what ``jax.distributed`` requires of a mesh that spans hosts).

Messages are small JSON documents broadcast with ``multihost_utils.broadcast_one_to_all``
(JAX's own collectives: gloo on CPU, NCCL on GPU, ICI/DCN on TPU): a fixed-size header with
the length, then the bytes padded to a power of two, so only a few broadcast programs are
ever compiled. ``agree`` is an all-gather of per-process flags (did each process's part of
a transfer arrive?), so the processes go on with the same set.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


class Lockstep:
    """The channel from process 0 of a multi-controller instance to the others."""

    def __init__(self):
        self.leader = jax.process_index() == 0
        self.processes = jax.process_count()

    def send(self, op: dict) -> None:
        """Process 0: the next device call, for every other process to make too."""
        assert self.leader
        data = json.dumps(op).encode()
        size = max(256, 1 << (len(data) - 1).bit_length())
        multihost_utils.broadcast_one_to_all(np.array([len(data), size], np.int32))
        buf = np.zeros(size, np.uint8)
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        multihost_utils.broadcast_one_to_all(buf)

    def receive(self) -> dict:
        """Another process: the next device call process 0 makes (blocks until it says)."""
        n, size = (int(x) for x in multihost_utils.broadcast_one_to_all(np.zeros(2, np.int32)))
        buf = multihost_utils.broadcast_one_to_all(np.zeros(size, np.uint8))
        return json.loads(bytes(np.asarray(buf)[:n]))

    def agree(self, flags: list[bool]) -> list[bool]:
        """Per entry, whether it holds on every process."""
        if not flags:
            return []
        every = multihost_utils.process_allgather(np.array(flags, np.int32))
        return [bool(x) for x in np.asarray(every).reshape(self.processes, -1).all(axis=0)]
