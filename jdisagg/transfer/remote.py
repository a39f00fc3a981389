"""KV transfer between processes (and hosts) over ``jax.experimental.transfer``.

A prefill instance in one process holds each finished prefix under a lease
(``jdisagg.serving.instance``); a decode instance in another process pulls it when it has
room. Pull-based, in three moves:

  1. decode: ``parts_of`` groups the shards of its destination layout (``prefix_sharding``)
     by process; each is a box of the prefix [L, T, K, H] (``reshard.Box``).
  2. decode -> prefill, on the control plane (the ``stage`` callable ``Remote`` is given):
     the prefill side cuts its prefix, on its own devices, into exactly those boxes
     (``reshard.move``: the same cutting as in one process) and registers each destination
     process's pieces with its transfer server under ``uuid + part`` (``stage``), with the
     pull timeout as deadline. It answers with one checksum per part (optional).
  3. decode: each process of the decode instance pulls its own part into its own devices
     (``Remote.fetch``), checks the checksum and assembles the destination arrays; nothing
     is resharded on the decode side.

So different shard splits (tp prefill -> pp x tp decode) move as the pieces each destination
shard needs, one single-device array each, in an order both sides compute from the same
boxes. The bytes only ever move through JAX's transfer server.

What JAX 0.10.2 does, and how this module lives with it (checked on CPU, 2026-12-01):

* Timeouts (``await_pull``'s and ``pull``'s) are enforced only when the server next handles
  an ``await_pull``: ``TransferServer`` ticks one every ``tick_s`` with a one-element array,
  so an entry nobody pulled is dropped (its arrays freed) and a pull of an id nobody
  registered fails with "Pull expired" within about a tick of its deadline. Deadlines are read
  to the whole second, truncated; ``_deadline`` rounds them up.
* A pull whose buffer count differs from what was registered waits forever, hence one
  single-device piece per destination shard on both sides.
* A pull from a process that hangs never fails: ``fetch`` waits on the arrays with its own
  deadline (polling ``Array.is_ready``) and then gives them up (``abandoned``); the
  connection's death (a killed process) does fail them.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import transfer as jax_transfer
from jax.sharding import NamedSharding, SingleDeviceSharding

from jdisagg.transfer.base import KVTransfer
from jdisagg.transfer.reshard import Box, Target, _box, _intersect, move

# Transfer-server settings: on an H200, 16 bulk addresses, 32 parallel copies and 4 MiB chunks
# pulled a 2048-token Llama-3-8B prefix at 12.0 GB/s, 8 x 16 x 8 MiB at 10.5 (BENCHMARKS.md,
# 2026-12-01); JAX's defaults (1 x 8 x 256 MiB) gave 3 GB/s (DESIGN.md).
ADDRESSES = 16
PARALLEL_COPIES = 32
TRANSFER_SIZE = 4 * 2**20
_TICK_UUID = 2**64 - 1  # the id the ticker registers; leases use ids below 2**63


class TransferFailed(RuntimeError):
    """A prefix could not be pulled (timeout, checksum mismatch, the prefill side gone)."""


@dataclasses.dataclass
class RemotePrefix:
    """A prefix held by a prefill instance in another process, as the decode side knows it
    (the scheduler reads first_token .. nbytes, like ``runtime.prefill.Prefix``)."""

    first_token: int
    first_logprob: object
    length: int  # prompt tokens it holds
    held_tokens: int  # positions (T, its length bucket)
    nbytes: int  # of k and v together
    shape: tuple[int, ...]  # of k and of v: [L, T, K, H]
    dtype: str
    transfer: str  # the prefill's transfer server address
    uuid: int  # its lease's id: part p is registered as uuid + p
    source: object = None  # what the ``stage`` callable needs to reach the prefill (its control address)


class TransferServer:
    """This process's ``jax.experimental.transfer`` server, and its connections to others'.

    It listens on ``advertise`` (this host's address that the other hosts reach) or else
    ``host``, on free ports: one for the server, ``addresses`` for bulk transports."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        advertise: str | None = None,
        addresses: int = ADDRESSES,
        parallel_copies: int = PARALLEL_COPIES,
        transfer_size: int = TRANSFER_SIZE,
        tick_s: float = 0.25,
    ):
        client = jax.local_devices()[0].client
        bind = advertise or host  # the bulk transports' addresses go to peers as they are bound
        self._server = jax_transfer.start_transfer_server(
            client, f"{bind}:0", [f"{bind}:0"] * addresses, parallel_copies, transfer_size
        )
        port = self._server.address().rsplit(":", 1)[1]
        self.address = f"{bind}:{port}"
        self._connections: dict[str, object] = {}
        self._lock = threading.Lock()
        self._tick = jax.device_put(np.zeros((1,), np.float32), jax.local_devices()[0])
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._run_ticker, args=(tick_s,), name="transfer-tick", daemon=True)
        self._ticker.start()

    def offer(self, uuid: int, arrays: Sequence[jax.Array], timeout_s: float) -> None:
        """Lets a peer pull ``arrays`` once, as ``uuid``, within ``timeout_s``; after that the
        server drops them."""
        self._server.await_pull(uuid, list(arrays), timeout=_deadline(timeout_s))

    def pull(self, address: str, uuid: int, specs: Sequence[jax.ShapeDtypeStruct], timeout_s: float) -> list:
        """Starts pulling ``uuid`` from the server at ``address``; the arrays fill in later."""
        with self._lock:
            conn = self._connections.get(address)
            if conn is None:
                conn = self._connections[address] = self._server.connect(address)
        return conn.pull(uuid, list(specs), timeout=_deadline(timeout_s))

    def _run_ticker(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            self._server.await_pull(_TICK_UUID, [self._tick], timeout=datetime.datetime.now())

    def close(self) -> None:
        self._stop.set()


def _deadline(seconds: float) -> datetime.datetime:
    """``seconds`` from now, rounded up to a whole second: the transfer server reads a
    deadline to the whole second, truncated (its expiries land on whole seconds), so an
    unrounded one cut a 2 s pull timeout to 1.0-2.0 s. The caller's own deadline
    (``Pulling.ready``) stays exact."""
    at = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
    return at.replace(microsecond=0) + datetime.timedelta(seconds=1) if at.microsecond else at


def parts_of(dst: NamedSharding, shape: tuple[int, ...]) -> tuple[list[list[Target]], int]:
    """The destination shards of an array of ``shape`` laid out as ``dst``, grouped by the
    process that holds them (processes in index order), and this process's part index."""
    by_process: dict[int, list[Target]] = {}
    for device, index in dst.devices_indices_map(shape).items():
        by_process.setdefault(device.process_index, []).append((device, _box(index, shape)))
    order = sorted(by_process)
    return [by_process[p] for p in order], order.index(jax.process_index())


def _home(x: jax.Array, box: Box) -> jax.Device:
    """The local device whose shard of ``x`` overlaps ``box`` the most (where its piece is cut)."""

    def overlap(shard) -> int:
        m = _intersect(_box(shard.index, x.shape), box)
        return 0 if m is None else int(np.prod([hi - lo for lo, hi in m]))

    return max(x.addressable_shards, key=overlap).device


def cut(k: jax.Array, v: jax.Array, parts: Sequence[Sequence[Box]]) -> list[list[jax.Array]]:
    """Prefill side: ``k`` and ``v`` cut into the boxes of each destination part, on this
    process's devices: per part, its k pieces then its v pieces."""
    out = []
    for boxes in parts:
        ks, vs = move((k, v), [(_home(k, box), box) for box in boxes])
        out.append([*ks, *vs])
    return out


def stage(
    server: TransferServer,
    uuid: int,
    k: jax.Array,
    v: jax.Array,
    parts: Sequence[Sequence[Box]],
    timeout_s: float,
    checksum: bool = False,
) -> list[int]:
    """Prefill side: ``cut``s the prefix and offers part p's pieces as ``uuid + p``. Returns
    each part's checksum (0s without ``checksum``)."""
    sums = []
    for p, pieces in enumerate(cut(k, v, parts)):
        server.offer(uuid + p, pieces, timeout_s)
        sums.append(kv_checksum(pieces) if checksum else 0)
    return sums


@jax.jit
def _hash(x: jax.Array) -> jax.Array:
    """A position-weighted sum of ``x``'s bits (uint32, wrapping): any flipped or moved element changes it."""
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def kv_checksum(pieces: Sequence[jax.Array]) -> int:
    """A checksum of ``pieces`` in order (each hashed on its own device)."""
    hashes = jax.device_get([_hash(p) for p in pieces])
    return sum(int(h) * (2 * i + 1) for i, h in enumerate(hashes)) % 2**32


# (prefix, the boxes of each destination part) -> each part's checksum; raises if it cannot stage.
StageFn = Callable[[RemotePrefix, list[list[Box]]], list[int]]


class Remote(KVTransfer):
    """Pulls prefixes held by prefill instances in other processes into this decode instance.

    ``stage`` asks a prefix's prefill process to cut and offer it (a control-plane call);
    ``timeout_s`` bounds each pull; ``checksum`` compares the pulled bytes with the prefill's.
    """

    def __init__(self, server: TransferServer, stage: StageFn, *, timeout_s: float = 10.0, checksum: bool = False):
        self.server, self._stage, self.timeout_s, self.checksum = server, stage, timeout_s, checksum
        self.abandoned: list[list] = []  # pulls given up on; kept until they end (freed then)
        self.failures = 0

    def pull(self, prefixes: Sequence[RemotePrefix], dst: NamedSharding) -> list[tuple[jax.Array, jax.Array]]:
        moved = self.pull_each(prefixes, dst)
        for m in moved:
            if isinstance(m, Exception):
                raise m
        return moved

    def pull_each(self, prefixes: Sequence[RemotePrefix], dst: NamedSharding) -> list:
        """Each prefix's (k, v) laid out as ``dst``, or the exception that prevented it."""
        return self.fetch(prefixes, dst, self.stage_all(prefixes, dst))

    def stage_all(self, prefixes: Sequence[RemotePrefix], dst: NamedSharding) -> list:
        """Asks each prefix's prefill process to offer it in ``dst``'s layout; each entry is
        the parts' checksums or the exception that prevented it (done by one process of a
        decode instance for all of them)."""
        out = []
        for p in prefixes:
            parts, _ = parts_of(dst, p.shape)
            try:
                out.append(self._stage(p, [[box for _, box in part] for part in parts]))
            except Exception as e:  # the prefill side refused or is gone: this prefix fails alone
                out.append(TransferFailed(f"staging {p.uuid:#x} at {p.source}: {e}"))
        return out

    def fetch(self, prefixes: Sequence[RemotePrefix], dst: NamedSharding, staged: Sequence) -> list:
        """This process's part of each staged prefix, pulled, checked and assembled; an
        exception in place of those that failed (``staged`` as ``stage_all`` returns it)."""
        pulling = self.begin(prefixes, dst, staged)
        while not pulling.ready():
            time.sleep(0.001)
        return pulling.finish()

    def begin(self, prefixes: Sequence[RemotePrefix], dst: NamedSharding, staged: Sequence) -> Pulling:
        """Starts ``fetch`` and returns at once: the caller polls ``ready`` (and meanwhile
        runs its decode steps), then calls ``finish``."""
        self._prune()
        out: list = list(staged)
        pending = {}
        for i, (p, sums) in enumerate(zip(prefixes, staged, strict=True)):
            if isinstance(sums, Exception):
                continue
            parts, me = parts_of(dst, p.shape)
            specs = [
                jax.ShapeDtypeStruct(_extent(box), jnp.dtype(p.dtype), sharding=SingleDeviceSharding(d))
                for d, box in parts[me]
            ]
            try:
                pending[i] = (self.server.pull(p.transfer, p.uuid + me, specs * 2, self.timeout_s), sums[me])
            except Exception as e:
                out[i] = TransferFailed(f"pulling {p.uuid:#x} from {p.transfer}: {e}")
        return Pulling(self, list(prefixes), dst, out, pending, time.monotonic() + self.timeout_s)

    def _prune(self) -> None:
        self.abandoned = [arrays for arrays in self.abandoned if not all(a.is_ready() for a in arrays)]


def _extent(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


class Pulling:
    """Pulls in flight (``Remote.begin``)."""

    def __init__(self, remote: Remote, prefixes, dst, out: list, pending: dict, deadline: float):
        self.remote, self.prefixes, self.dst, self.deadline = remote, prefixes, dst, deadline
        self._out, self._pending = out, pending
        self.started = time.perf_counter()

    def ready(self) -> bool:
        """Every pull has its data (or failed), or the timeout has passed."""
        arrived = all(a.is_ready() for arrays, _ in self._pending.values() for a in arrays)
        return arrived or time.monotonic() > self.deadline

    def finish(self) -> list:
        """Each prefix's (k, v) in the destination layout, or why it failed; pulls whose data
        has not arrived fail (timed out) and are given up."""
        out = self._out
        for i, (arrays, want) in self._pending.items():
            p = self.prefixes[i]
            if not all(a.is_ready() for a in arrays):
                self.remote.abandoned.append(arrays)
                why = f"no data within {self.remote.timeout_s:g} s"
                out[i] = TransferFailed(f"pulling {p.uuid:#x} from {p.transfer}: {why}")
                continue
            try:
                jax.block_until_ready(arrays)
            except Exception as e:  # e.g. the prefill process died mid-transfer, or the pull expired there
                out[i] = TransferFailed(f"pulling {p.uuid:#x} from {p.transfer}: {e}")
                continue
            if self.remote.checksum and kv_checksum(arrays) != want:
                out[i] = TransferFailed(f"pulling {p.uuid:#x} from {p.transfer}: KV checksum mismatch")
                continue
            n = len(arrays) // 2
            out[i] = tuple(
                jax.make_array_from_single_device_arrays(p.shape, self.dst, a) for a in (arrays[:n], arrays[n:])
            )
        self.remote.failures += sum(isinstance(o, Exception) for o in out)
        return out
