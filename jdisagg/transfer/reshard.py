"""KV transfer: land a request's prefix KV, held on the prefill mesh, in the layout the
decode mesh asks for, device to device.

``jax.device_put`` between two meshes whose shard splits differ (TP-sharded prefill KV
to a PP x TP decode layout) falls back to a copy through host memory. ``reshard`` avoids
it: every destination shard is cut into the boxes where it meets a source shard; each box
is sliced on its source device, copied straight to its destination device (a plain
single-device to single-device copy), and the boxes are concatenated there. The pieces
are then assembled into one array on the destination mesh without any host trip. Cutting,
copying and joining are each one dispatch per device, for k and v together; a shard that
moves whole is neither cut nor joined. ``move`` does the cutting and joining for any list of
(device, box) targets: ``transfer.remote`` uses it to cut a prefix, on the prefill side,
into the pieces each destination shard of a decode instance in another process needs.
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


Target = tuple[jax.Device, Box]  # where a piece goes: a device, and the box of the array it holds


def move(arrays: tuple[jax.Array, ...], targets: Sequence[Target]) -> list[list[jax.Array]]:
    """Each target's box of each of ``arrays`` (same shape and sharding), as a single-device
    array on the target's device: ``out[i][j]`` is array i's box j. Device to device.

    Per source device one compiled call cuts every piece it sends; one batched
    ``device_put`` moves all pieces; per target one compiled call joins its pieces.
    """
    x = arrays[0]
    shards = [[s for s in a.addressable_shards if s.replica_id == 0] for a in arrays]
    sends = []  # (array, target index, box) per piece, in the order they are cut
    pieces = []
    with jax.transfer_guard_device_to_host("disallow"):
        for k, source in enumerate(shards[0]):
            box = _box(source.index, x.shape)
            meets = [(j, m) for j, (_, t) in enumerate(targets) if (m := _intersect(box, t)) is not None]
            if not meets:
                continue
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
                for n, (j, m) in enumerate(meets):
                    sends.append((i, j, m))
                    pieces.append(cut[i * len(meets) + n])
        moved = jax.device_put(pieces, [targets[j][0] for _, j, _ in sends])
        out: list[list] = [[None] * len(targets) for _ in arrays]
        for j, (_, target) in enumerate(targets):
            mine = [(i, m, p) for (i, t, m), p in zip(sends, moved, strict=True) if t == j]
            boxes = tuple(m for i, m, _ in mine if i == 0)
            ordered = [p for i in range(len(arrays)) for a, _, p in mine if a == i]
            joined = ordered if boxes == (target,) else _joiner(boxes, len(arrays))(*ordered)
            for i, shard in enumerate(joined):
                out[i][j] = shard
    return out


def targets_of(dst: NamedSharding, shape: tuple[int, ...]) -> list[Target]:
    """This process's devices of ``dst`` and the box of an array of ``shape`` each holds."""
    return [(d, _box(i, shape)) for d, i in dst.addressable_devices_indices_map(shape).items()]


def reshard(arrays: tuple[jax.Array, ...], dst: NamedSharding) -> tuple[jax.Array, ...]:
    """``arrays`` (same shape and sharding) laid out as ``dst``, device to device: each
    destination shard is ``move``d onto its device and the shards are assembled there."""
    x = arrays[0]
    if x.sharding.is_equivalent_to(dst, x.ndim):
        return arrays
    out = move(arrays, targets_of(dst, x.shape))
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
