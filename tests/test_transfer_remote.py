"""KV over ``jax.experimental.transfer`` (transfer.remote): a prefix cut on the prefill side
into the decode layout's pieces, pulled, checked and assembled. Two transfer servers in this
process stand for the two sides (the same sockets as between processes; the multi-process
tests run it between real processes)."""

import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdisagg.model import sharding
from jdisagg.transfer import remote


@pytest.fixture(scope="module")
def servers():
    prefill, decode = remote.TransferServer(tick_s=0.05), remote.TransferServer(tick_s=0.05)
    yield prefill, decode
    prefill.close()
    decode.close()


def _meshes():
    d = jax.devices()
    return sharding.make_mesh(d[:4], 1, 4), sharding.make_mesh(d[4:], 2, 2)


_uuids = iter(range(1 << 20, 1 << 30, 256))


def _prefix(src: NamedSharding, prefill: remote.TransferServer, shape=(4, 32, 4, 8)):
    rng = np.random.default_rng(0)
    host = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    k, v = (jax.device_put(x, src) for x in host)
    p = remote.RemotePrefix(1, None, 30, shape[1], 2 * k.nbytes, shape, "float32", prefill.address, next(_uuids))
    return p, (k, v), host


@pytest.mark.parametrize(
    "src_spec,dst_spec",
    [
        (P(None, None, "tp", None), P("pp", None, "tp", None)),  # tp=4 -> pp=2 x tp=2
        (P(None, None, "tp", None), P("pp", None, None, None)),  # tp=4 -> pp only (replicated over tp)
        (P(None, None, None, None), P("pp", None, "tp", None)),  # replicated source
        (P("tp", None, None, None), P(None, None, "tp", "pp")),  # arbitrary splits
    ],
)
def test_pull_lands_in_the_decode_layout(servers, src_spec, dst_spec):
    prefill, decode = servers
    prefill_mesh, decode_mesh = _meshes()
    dst = NamedSharding(decode_mesh, dst_spec)
    p, (k, v), (hk, hv) = _prefix(NamedSharding(prefill_mesh, src_spec), prefill)
    asked = []

    def stage(prefix, parts):
        asked.append(parts)
        return remote.stage(prefill, prefix.uuid, k, v, parts, timeout_s=5, checksum=True)

    [(k2, v2)] = remote.Remote(decode, stage, timeout_s=5, checksum=True).pull([p], dst)
    assert k2.sharding == dst and v2.sharding == dst
    np.testing.assert_array_equal(np.asarray(k2), hk)
    np.testing.assert_array_equal(np.asarray(v2), hv)
    # One part (one decode process), one box per destination device, each a destination shard.
    [[boxes]] = asked
    assert len(boxes) == 4
    for shard in k2.addressable_shards:
        assert tuple(s.indices(n)[:2] for s, n in zip(shard.index, k2.shape, strict=True)) in boxes


def test_checksum_mismatch_fails_the_prefix_alone(servers):
    prefill, decode = servers
    prefill_mesh, decode_mesh = _meshes()
    dst = NamedSharding(decode_mesh, P("pp", None, "tp", None))
    good, good_kv, host = _prefix(NamedSharding(prefill_mesh, P(None, None, "tp", None)), prefill)
    bad, bad_kv, _ = _prefix(NamedSharding(prefill_mesh, P(None, None, "tp", None)), prefill)
    kv = {good.uuid: good_kv, bad.uuid: bad_kv}

    def stage(prefix, parts):
        sums = remote.stage(prefill, prefix.uuid, *kv[prefix.uuid], parts, timeout_s=5, checksum=True)
        return [s ^ 1 for s in sums] if prefix is bad else sums  # as if a byte changed on the way

    out = remote.Remote(decode, stage, timeout_s=5, checksum=True).pull_each([bad, good], dst)
    assert isinstance(out[0], remote.TransferFailed) and "checksum" in str(out[0])
    np.testing.assert_array_equal(np.asarray(out[1][0]), host[0])


def test_a_pull_nobody_offers_fails_within_its_timeout(servers):
    """The prefill side answered the stage call but never offered the KV (a hung transfer)."""
    prefill, decode = servers
    prefill_mesh, decode_mesh = _meshes()
    p, _, _ = _prefix(NamedSharding(prefill_mesh, P(None, None, "tp", None)), prefill)
    start = time.monotonic()
    [out] = remote.Remote(decode, lambda prefix, parts: [0], timeout_s=0.5).pull_each(
        [p], NamedSharding(decode_mesh, P("pp", None, "tp", None))
    )
    assert isinstance(out, remote.TransferFailed)
    assert time.monotonic() - start < 3


def test_a_staging_error_fails_the_prefix(servers):
    prefill, decode = servers
    prefill_mesh, decode_mesh = _meshes()
    p, _, _ = _prefix(NamedSharding(prefill_mesh, P(None, None, "tp", None)), prefill)

    def stage(prefix, parts):
        raise RuntimeError("no such lease")

    [out] = remote.Remote(decode, stage, timeout_s=5).pull_each([p], NamedSharding(decode_mesh, P("pp")))
    assert isinstance(out, remote.TransferFailed) and "no such lease" in str(out)


def test_an_offer_nobody_pulls_is_dropped_at_its_deadline(servers):
    """What the server was offered is freed when the offer's deadline passes (the ticker makes
    JAX drop it), so a pull after that fails instead of receiving stale KV."""
    prefill, decode = servers
    prefill_mesh, decode_mesh = _meshes()
    dst = NamedSharding(decode_mesh, P("pp", None, "tp", None))
    p, (k, v), _ = _prefix(NamedSharding(prefill_mesh, P(None, None, "tp", None)), prefill)
    sums = []

    def stage_early(prefix, parts):  # offered with a 0.2 s deadline, pulled 2 s later
        sums.append(remote.stage(prefill, prefix.uuid, k, v, parts, timeout_s=0.2))
        time.sleep(2.0)  # past the deadline as the server keeps it: rounded up to a whole second (remote._deadline)
        return sums[-1]

    [out] = remote.Remote(decode, stage_early, timeout_s=1.0).pull_each([p], dst)
    assert isinstance(out, remote.TransferFailed)


def test_checksum_sees_a_moved_element():
    x = jax.numpy.arange(64, dtype=jax.numpy.float32).reshape(8, 8)
    y = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert remote.kv_checksum([x]) == remote.kv_checksum([x + 0])
    assert remote.kv_checksum([x]) != remote.kv_checksum([y])
    assert remote.kv_checksum([x, y]) != remote.kv_checksum([y, x])
    assert remote.kv_checksum([x.astype(jax.numpy.bfloat16)]) != remote.kv_checksum([y.astype(jax.numpy.bfloat16)])
