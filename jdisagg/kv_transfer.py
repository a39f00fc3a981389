"""KV transfer: land a request's prefix KV, held on the prefill mesh, in the layout the
decode mesh asks for, device to device.

``jax.device_put`` between two meshes whose shard splits differ (TP-sharded prefill KV
to a PP x TP decode layout) falls back to a copy through host memory. ``reshard`` avoids
it: every destination shard is cut into the boxes where it meets a source shard; each box
is sliced on its source device, copied straight to its destination device (a plain
single-device to single-device copy), and the boxes are concatenated there. The pieces
are then assembled into one array on the destination mesh without any host trip.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from jdisagg.prefill import Prefix

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


def reshard(x: jax.Array, dst: NamedSharding) -> jax.Array:
    """``x`` with sharding ``dst``, moved device to device (never through host memory)."""
    if x.sharding.is_equivalent_to(dst, x.ndim):
        return x
    sources = [(_box(s.index, x.shape), s.data) for s in x.addressable_shards if s.replica_id == 0]
    shards = []
    with jax.transfer_guard_device_to_host("disallow"):
        for device, index in dst.addressable_devices_indices_map(x.shape).items():
            target = _box(index, x.shape)
            pieces = []
            for box, data in sources:
                meet = _intersect(box, target)
                if meet is None:
                    continue
                local = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(meet, box, strict=True))
                piece = data if meet == box else data[local]
                pieces.append((meet, jax.device_put(piece, device)))
            shards.append(_assemble(pieces))
    return jax.make_array_from_single_device_arrays(x.shape, dst, shards)


def transfer(prefix: Prefix, dst: NamedSharding) -> tuple[jax.Array, jax.Array]:
    """The prefix's k and v [L, T, K, H], laid out as ``dst`` on the decode mesh."""
    return reshard(prefix.k, dst), reshard(prefix.v, dst)
