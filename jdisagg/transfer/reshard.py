"""KV transfer: land a request's prefix KV, held on the prefill mesh, in the layout the
decode mesh asks for, device to device.

``jax.device_put`` between two meshes whose shard splits differ (TP-sharded prefill KV
to a PP x TP decode layout) falls back to a copy through host memory. ``reshard`` avoids
it: every destination shard is cut into the boxes where it meets a source shard; each box
is sliced on its source device, copied straight to its destination device (a plain
single-device to single-device copy), and the boxes are concatenated there. The pieces
are then assembled into one array on the destination mesh without any host trip. Cutting,
copying and joining are each one dispatch per device, for k and v together; a shard that
moves whole is neither cut nor joined.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

from jdisagg.runtime.prefill import Prefix
from jdisagg.transfer.base import KVTransfer

Box = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def _assemble(pieces: list[tuple[Box, jax.Array]]) -> jax.Array:
    """Concatenates pieces that tile a box (a grid of sub-boxes) on one device."""
    if len(pieces) == 1:
        return pieces[0][1]
    ndim = len(pieces[0][0])
    for d in range(ndim):
        starts = sorted({box[d][0] for box, _ in pieces})
        if len(starts) > 1:
            groups = [_assemble([p for p in pieces if p[0][d][0] == s]) for s in starts]
            return jax.numpy.concatenate(groups, axis=d)
    raise ValueError("pieces overlap")


@functools.cache
def _cutter(cuts: tuple[tuple[tuple[int, int], ...], ...]):
    """One compiled call that cuts every piece a source shard sends, for several arrays."""

    def cut(*arrays):
        return tuple(a[tuple(slice(lo, hi) for lo, hi in c)] for a in arrays for c in cuts)

    return jax.jit(cut)


@functools.cache
def _joiner(boxes: tuple[Box, ...], n_arrays: int):
    """One compiled call that assembles a destination shard of each array from its pieces."""

    def join(*pieces):
        per_array = len(boxes)
        return tuple(
            _assemble(list(zip(boxes, pieces[i * per_array : (i + 1) * per_array], strict=True)))
            for i in range(n_arrays)
        )

    return jax.jit(join)


def reshard(arrays: tuple[jax.Array, ...], dst: NamedSharding) -> tuple[jax.Array, ...]:
    """``arrays`` (same shape and sharding) laid out as ``dst``, device to device.

    Per source device one compiled call cuts every piece it sends; one batched
    ``device_put`` moves all pieces; per destination device one compiled call joins them.
    """
    x = arrays[0]
    if x.sharding.is_equivalent_to(dst, x.ndim):
        return arrays
    shards = [[s for s in a.addressable_shards if s.replica_id == 0] for a in arrays]
    targets = {d: _box(i, x.shape) for d, i in dst.addressable_devices_indices_map(x.shape).items()}
    sends = []  # (destination device, box) per piece, in the order they are cut
    pieces = []
    with jax.transfer_guard_device_to_host("disallow"):
        for k, source in enumerate(shards[0]):
            box = _box(source.index, x.shape)
            meets = [(d, m) for d, t in targets.items() if (m := _intersect(box, t)) is not None]
            if [m for _, m in meets] == [box]:
                # The whole shard goes to one device: no cut, so nothing waits behind whatever
                # the source device is running (a prefill call, in a disaggregated server).
                cut = [a[k].data for a in shards]
            else:
                cuts = tuple(
                    tuple((lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(m, box, strict=True)) for _, m in meets
                )
                cut = _cutter(cuts)(*(a[k].data for a in shards))
            for i in range(len(arrays)):
                for j, (d, m) in enumerate(meets):
                    sends.append((i, d, m))
                    pieces.append(cut[i * len(meets) + j])
        moved = jax.device_put(pieces, [d for _, d, _ in sends])
        out = [[] for _ in arrays]
        for device, target in targets.items():
            mine = [(i, m, p) for (i, d, m), p in zip(sends, moved, strict=True) if d == device]
            boxes = tuple(m for i, m, _ in mine if i == 0)
            ordered = [p for i in range(len(arrays)) for j, m, p in mine if j == i]
            joined = ordered if boxes == (target,) else _joiner(boxes, len(arrays))(*ordered)
            for i, shard in enumerate(joined):
                out[i].append(shard)
    return tuple(jax.make_array_from_single_device_arrays(x.shape, dst, o) for o in out)


def transfer(prefix: Prefix, dst: NamedSharding) -> tuple[jax.Array, jax.Array]:
    """The prefix's k and v [L, T, K, H], laid out as ``dst`` on the decode mesh."""
    return reshard((prefix.k, prefix.v), dst)


class InProcess(KVTransfer):
    """Both instances in this process: ``reshard`` device to device."""

    def pull(self, prefixes: Sequence[Prefix], dst: NamedSharding) -> list[tuple[jax.Array, jax.Array]]:
        moved = [transfer(p, dst) for p in prefixes]
        jax.block_until_ready(moved)
        return moved
