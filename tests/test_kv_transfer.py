"""KV moves prefill mesh -> decode mesh device to device, never through host memory."""

import contextlib

import jax
import numpy as np
import pytest
from jax._src import array as jax_array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdisagg.model import axes, sharding
from jdisagg.model.config import shape
from jdisagg.model.decoder import init_params
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.params import SamplingParams
from jdisagg.transfer import reshard


@contextlib.contextmanager
def no_host_copies():
    """Makes JAX's host fallback fail: on CPU the transfer guard cannot see it (CPU buffers
    are host memory), but mismatched-split device_put reads ``jax.Array._value``."""
    original = jax_array.ArrayImpl._value

    def refuse(self):
        raise AssertionError("array copied through host memory")

    jax_array.ArrayImpl._value = property(refuse)
    try:
        yield
    finally:
        jax_array.ArrayImpl._value = original


def _meshes():
    d = jax.devices()
    return sharding.make_mesh(d[:4], 1, 4), sharding.make_mesh(d[4:], 2, 2)


def test_plain_device_put_goes_through_host():
    """The guard above really catches JAX's host path (so the next test means something)."""
    prefill_mesh, decode_mesh = _meshes()
    x = jax.device_put(np.ones((4, 32, 4, 8), np.float32), NamedSharding(prefill_mesh, P(None, None, "tp", None)))
    with no_host_copies(), pytest.raises(AssertionError, match="host memory"):
        jax.block_until_ready(jax.device_put(x, NamedSharding(decode_mesh, P("pp", None, "tp", None))))


@pytest.mark.parametrize(
    "src_spec,dst_spec",
    [
        (P(None, None, "tp", None), P("pp", None, "tp", None)),  # tp=4 -> pp=2 x tp=2
        (P(None, None, "tp", None), P("pp", None, None, None)),  # tp=4 -> pp only (replicated over tp)
        (P(None, None, None, None), P("pp", None, "tp", None)),  # replicated source
        (P("tp", None, None, None), P(None, None, "tp", "pp")),  # arbitrary splits
    ],
)
def test_reshard_device_to_device(src_spec, dst_spec):
    prefill_mesh, decode_mesh = _meshes()
    host = np.random.default_rng(0).standard_normal((4, 32, 4, 8)).astype(np.float32)
    x = jax.device_put(host, NamedSharding(prefill_mesh, src_spec))
    dst = NamedSharding(decode_mesh, dst_spec)
    with no_host_copies():
        (y,) = jax.block_until_ready(reshard.reshard((x,), dst))
    assert y.sharding == dst
    np.testing.assert_array_equal(np.asarray(y), host)
    for shard in y.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])


def test_whole_shards_move_without_cut_or_join():
    """Same split on both sides (one device -> another, tp=2 -> tp=2 on other devices): each
    shard is copied as it is, with no slicing program on the source device (which a
    disaggregated server keeps busy with prefill) and no joining program on the destination."""
    d = jax.devices()
    host = np.random.default_rng(1).standard_normal((4, 32, 4, 8)).astype(np.float32)
    for src_devices, dst_devices, spec in (([0], [1], P()), ([0, 1], [2, 3], P(None, None, "x"))):
        src = NamedSharding(jax.sharding.Mesh(np.array([d[i] for i in src_devices]), ("x",)), spec)
        dst = NamedSharding(jax.sharding.Mesh(np.array([d[i] for i in dst_devices]), ("x",)), spec)
        x = jax.device_put(host, src)
        reshard._cutter.cache_clear()
        reshard._joiner.cache_clear()
        with no_host_copies():
            (y,) = jax.block_until_ready(reshard.reshard((x,), dst))
        assert reshard._cutter.cache_info().currsize == reshard._joiner.cache_info().currsize == 0
        assert y.sharding == dst
        np.testing.assert_array_equal(np.asarray(y), host)


def test_prefix_lands_in_decode_pages():
    """prefill tp=4 -> decode pp=2 x tp=2: the prefix written into pages equals prefill's KV."""
    cfg = shape("tiny-llama")
    prefill_mesh, decode_mesh = _meshes()
    rules = axes.DEFAULT_RULES
    host = init_params(cfg, jax.random.key(0))

    def place(mesh):
        return jax.device_put(host, sharding.param_shardings(host, mesh, rules))

    prefill = PrefillRunner(
        cfg, place(prefill_mesh), prefill_mesh, rules, length_buckets=(32,), max_batch=2, token_budget=64
    )
    decode = DecodeRunner(
        cfg,
        place(decode_mesh),
        decode_mesh,
        rules,
        max_batch=2,
        n_pages=16,
        page_size=8,
        max_seq_len=64,
        micro_batches=2,
    )
    prefixes = prefill.run([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4]], [SamplingParams()] * 2)
    prefix = prefixes[0]
    pages = [7, 3]  # 11 tokens -> 2 pages of 8, deliberately out of order
    with no_host_copies():
        k, v = reshard.transfer(prefix, decode.prefix_sharding)
        decode.insert(k, v, pages)
        jax.block_until_ready(decode.k_pages)
    assert k.sharding == decode.prefix_sharding
    expect_k, expect_v = np.asarray(prefix.k)[:, :16], np.asarray(prefix.v)[:, :16]
    got_k = np.asarray(decode.k_pages)[:, pages].reshape(expect_k.shape)
    got_v = np.asarray(decode.v_pages)[:, pages].reshape(expect_v.shape)
    np.testing.assert_array_equal(got_k[:, :11], expect_k[:, :11])
    np.testing.assert_array_equal(got_v[:, :11], expect_v[:, :11])
    # Each decode device holds only its stage's layers and its kv heads of the pages.
    for shard in decode.k_pages.addressable_shards:
        assert shard.data.shape == (cfg.n_layers // 2, 16, 8, cfg.n_kv_heads // 2, cfg.head_dim)
