"""The attention kernels on instances of several devices (``attention.HeadSplit``).

Each kernel run per device under ``shard_map`` against float64: the decode kernels inside a
pp=2 x tp=2 pipeline's vmapped stages, the prompt kernels on a tp=2 mesh, each device seeing
only its own heads and the compiled program holding no collective. The runners of a
pp=2 x tp=2 decode and a tp=2 prefill instance: the same tokens and the same collectives
with the kernels as with the gather and einsum paths. An engine whose tp=2 prefill and
pp=2 x tp=2 decode attend with the TPU kernels: one device's tokens.

On CPU the GPU kernels run in the Pallas interpreter and the TPU kernels in Pallas' TPU
interpreter (``attention.KERNEL_PLATFORM = "tpu"``); neither has run compiled on a sharded
instance. Shapes are the smallest the kernels take (head dim 128 for the TPU kernels).
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdisagg.model import attention, axes, flash_kernel, paged_kernel, sharding, tpu_attention
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.params import SamplingParams

try:  # pytest's default import mode puts tests/ itself on sys.path
    import test_kernels
    import test_model
    import test_tpu_kernels
except ImportError:  # tests/ became a package
    from tests import test_kernels, test_model, test_tpu_kernels

H = tpu_attention.LANES  # a head dim both platforms' kernels take
RULES = dict(axes.DEFAULT_RULES)
_COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\(")


def _mesh(pp: int, tp: int) -> jax.sharding.Mesh:
    return sharding.make_mesh(jax.devices()[: pp * tp], pp, tp)


def _collectives(hlo: str) -> collections.Counter:
    """The collectives of a compiled program, by kind and operand shape."""
    return collections.Counter(_COLLECTIVE.findall(hlo))


@pytest.fixture(params=["gpu", "tpu"])
def kernels(request, monkeypatch):
    """The platform's kernel modules (prompt kernel, decode kernel), interpreted; records the
    shapes each kernel is traced with (per device, under shard_map)."""
    tpu = request.param == "tpu"
    if tpu:
        test_tpu_kernels._interpreted("paged_attention", test_tpu_kernels._decode_case)
    monkeypatch.setattr(attention, "KERNEL_PLATFORM", "tpu" if tpu else "auto")
    seen = {"prompt": [], "decode": []}

    def recorded(name, fn):
        def wrapper(q, *args, **kwargs):
            seen[name].append((q.shape, args[0].shape))
            return fn(q, *args, **kwargs)

        return wrapper

    prompt_module, prompt_name = (tpu_attention, "prompt_attention") if tpu else (flash_kernel, "attention")
    decode_module = tpu_attention if tpu else paged_kernel
    monkeypatch.setattr(prompt_module, prompt_name, recorded("prompt", getattr(prompt_module, prompt_name)))
    monkeypatch.setattr(decode_module, "decode_attention", recorded("decode", decode_module.decode_attention))
    return request.param, seen


def test_decode_kernel_per_stage_and_head_matches_float64(kernels):
    """Two pipeline stages (vmapped with spmd_axis_name, as runtime.decode.pipeline does), each
    with its own layers, pages, table and lengths (mid-page, a whole table, a padding row)."""
    platform, seen = kernels
    rng = np.random.default_rng(3)
    stages, layers, n_pages, z, k, n, b, w = 2, 2, 16, 8, 2, 4, 3, 5
    pool = (stages, layers, n_pages, z, k, H)
    k_pages = rng.standard_normal(pool).astype(np.float32)
    v_pages = rng.standard_normal(pool).astype(np.float32)
    q = rng.standard_normal((stages, b, n, H)).astype(np.float32)
    tables = np.stack([rng.permutation(np.arange(1, n_pages))[: b * w].reshape(b, w) for _ in range(stages)])
    tables = tables.astype(np.int32)
    lengths = np.array([[5, 40, 0], [17, 1, 33]], np.int32)
    mesh = _mesh(2, 2)
    heads = attention.head_split(mesh, RULES)

    def stage(q_bnh, k_pages, v_pages, table_bw, lengths_b):
        kv = attention.PagedKV(k_pages, v_pages, table_bw, "pallas", heads)
        return kv.read(jnp.int32(1), q_bnh[:, None], (lengths_b - 1)[:, None])[:, 0]

    def put(a, *spec):
        return jax.device_put(a, NamedSharding(mesh, P(*spec)))

    args = (
        put(q, "pp", None, "tp"),
        put(k_pages, "pp", None, None, None, "tp"),
        put(v_pages, "pp", None, None, None, "tp"),
        put(tables),
        put(lengths),
    )
    compiled = jax.jit(jax.vmap(stage, spmd_axis_name="pp")).lower(*args).compile()
    got = np.asarray(compiled(*args))
    # Each device: its stage's layers, all pages, its one KV head and two query heads.
    assert seen["decode"] == [((b, n // 2, H), (layers, n_pages, z, k // 2, H))]
    assert not _collectives(compiled.as_text())
    for s in range(stages):
        want = test_tpu_kernels._decode_reference(
            q[s], k_pages[s], v_pages[s], 1, tables[s], lengths[s], round_kv=platform == "tpu"
        )
        assert np.max(np.abs(got[s] - want)) < 1e-5, (s, np.max(np.abs(got[s] - want)))
        assert not got[s, lengths[s] == 0].any()  # the padding row read nothing


def test_prompt_kernel_per_head_matches_float64(kernels):
    """Packed rows (prompts crossing block edges, padding on either side) on a tp=2 mesh."""
    _, seen = kernels
    rng = np.random.default_rng(4)
    b, t, n, k = 2, 128, 4, 2
    q = rng.normal(size=(b, t, n, H)).astype(np.float32)
    k_ = rng.normal(size=(b, t, k, H)).astype(np.float32)
    v = rng.normal(size=(b, t, k, H)).astype(np.float32)
    pos, seg = test_kernels._packed([[10, 57, 1, 20]], t)
    pos1, seg1 = test_kernels._packed([[30, 70]], t, left_pad=16)
    pos, seg = np.concatenate([pos, pos1]), np.concatenate([seg, seg1])
    mesh = _mesh(1, 2)
    heads = attention.head_split(mesh, RULES)
    split = NamedSharding(mesh, P(None, None, "tp"))
    args = (*jax.device_put((q, k_, v), split), pos, seg)
    compiled = jax.jit(lambda *a: attention.prompt_attention(*a, kernel=heads)).lower(*args).compile()
    got = np.asarray(compiled(*args))
    assert seen["prompt"] == [((b, t, n // 2, H), (b, t, k // 2, H))]
    assert not _collectives(compiled.as_text())
    want = test_kernels._softmax_reference(q, k_, v, pos, seg)
    valid = pos >= 0
    err = np.max(np.abs(got - want)[valid]) / np.max(np.abs(want[valid]))
    assert err < 1e-5, err


def test_head_split_follows_the_rules():
    assert attention.head_split(_mesh(1, 1), RULES) is attention.ONE_DEVICE
    mesh = _mesh(2, 2)
    assert attention.head_split(mesh, RULES) == attention.HeadSplit(mesh, "tp")
    assert attention.head_split(mesh, {**RULES, axes.HEADS: None, axes.KV_HEADS: None}) == attention.HeadSplit(mesh)
    # Query heads split, KV heads whole: a device's query heads would need others' KV heads.
    split_kv = {**RULES, axes.KV_HEADS: None}
    assert attention.head_split(mesh, split_kv) is None
    assert attention.prompt_kernel(None) is None  # prompt rows fall back to the einsums
    kv = attention.PagedKV(jnp.zeros((1, 2, 4, 1, 8)), jnp.zeros((1, 2, 4, 1, 8)), jnp.zeros((1, 1), jnp.int32))
    kv = kv.replace(decode_attention="pallas", heads=None)
    with pytest.raises(ValueError, match=r"the sharding rules must put heads and kv_heads on the same mesh axis$"):
        kv.read(0, jnp.zeros((1, 1, 2, 8)), jnp.zeros((1, 1), jnp.int32))


# The GPU kernels' smallest model: head dim 16, two KV heads (one per device at tp=2), two layers.
TINY = test_kernels.KERNEL_CONFIGS["llama"].replace(n_layers=2)


@functools.cache
def _tiny_params() -> dict:
    return test_model.random_params(TINY, seed=8)  # host arrays


def test_pipelined_decode_runner_kernel_equals_gather():
    """A pp=2 x tp=2 decode instance of two micro-batches over a pool of
    random KV: the Pallas kernel (the GPU one, interpreted) samples the gather path's tokens,
    writes the same pages, and its program holds the same collectives (the kernel adds none)."""
    cfg = TINY
    mesh = _mesh(2, 2)
    params = _tiny_params()
    params = jax.device_put(params, sharding.param_shardings(params, mesh, RULES))
    pool = (cfg.n_layers, 32, 16, cfg.n_kv_heads, cfg.head_dim)
    rng = np.random.default_rng(9)
    k_pages, v_pages = (rng.standard_normal(pool).astype(np.float32) for _ in range(2))
    lengths = [5, 40, 0, 23]  # tokens already in the pool; the third row is padding
    tables = [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(4)]
    out = {}
    for attend in ("dot", "pallas"):
        runner = DecodeRunner(
            cfg, params, mesh, RULES, max_batch=4, n_pages=32, page_size=16, max_seq_len=64,
            micro_batches=2, batch_buckets=(4,), decode_attention=attend,
        )  # fmt: skip
        runner.k_pages, runner.v_pages = jax.device_put((k_pages, v_pages), runner.pages_sharding)
        inputs = runner._step_inputs(
            [7, 8, 0, 9], [n - 1 if n else -1 for n in lengths], tables, [SamplingParams()] * 4
        )
        args = (runner.params, runner.k_pages, runner.v_pages, *inputs)
        compiled = runner._step.lower(*args).compile()
        sampled, k_out, _ = compiled(*args)
        out[attend] = jax.device_get(sampled.tokens), np.asarray(k_out), _collectives(compiled.as_text())
    real = [0, 1, 3]  # the padding row samples garbage, different on each path
    assert out["pallas"][0][:, real].tolist() == out["dot"][0][:, real].tolist()
    # Pages past the null page (where the padding row writes garbage, different on each path).
    np.testing.assert_allclose(out["pallas"][1][:, 1:], out["dot"][1][:, 1:], atol=1e-5)
    assert out["pallas"][2] == out["dot"][2]


attention_ = flash_kernel.attention


def test_tp2_prefill_runner_kernel_equals_einsums(monkeypatch):
    """A tp=2 prefill call of three packed prompts: the flash kernel (interpreted) gives the
    einsums' first tokens and prefix KV, and its program the einsums' collectives."""
    cfg = TINY
    mesh = _mesh(1, 2)
    params = _tiny_params()
    params = jax.device_put(params, sharding.param_shardings(params, mesh, RULES))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 20, 3)]
    traced = []
    monkeypatch.setattr(flash_kernel, "attention", lambda q, *a: traced.append(q.shape) or attention_(q, *a))
    out = {}
    for mode in ("xla", "kernel"):
        monkeypatch.setattr(attention, "PROMPT_ATTENTION", mode)
        runner = PrefillRunner(cfg, params, mesh, RULES, length_buckets=(8, 16, 32), max_batch=4, token_budget=32)
        tokens_1n, pos_1n, *rest = runner._inputs(prompts, [SamplingParams()] * 3)
        args = (runner.params, tokens_1n, pos_1n, *rest)
        compiled = runner._step.lower(*args).compile()
        first, k, v = compiled(*args)
        valid = pos_1n[0] >= 0  # padding's KV is garbage either way (its queries see nothing)
        out[mode] = (
            jax.device_get(first.tokens),
            np.asarray(k)[:, 0, valid],
            np.asarray(v)[:, 0, valid],
            _collectives(compiled.as_text()),
        )
    assert traced == [(1, 32, cfg.n_heads // 2, cfg.head_dim)]  # the kernel once (scanned layers), per device
    assert out["kernel"][0].tolist() == out["xla"][0].tolist()
    np.testing.assert_allclose(out["kernel"][1], out["xla"][1], atol=1e-5)
    np.testing.assert_allclose(out["kernel"][2], out["xla"][2], atol=1e-5)
    assert out["kernel"][3] == out["xla"][3]
