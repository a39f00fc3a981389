"""The CPU host loop's forms of a step: projections over output-major weights
(``host_loop.rows_dot_general``), decode attention a block of pages at a time (``attention.attend_blocks``) and
the sampler's skipped top-k, against float64 NumPy and the forms they replace."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.model import attention, decoder, host_loop
from jdisagg.model.config import shape
from jdisagg.model.sampler import SamplingArrays, sample
from jdisagg.sched.params import SamplingParams

try:  # pytest's default import mode puts tests/ itself on sys.path
    import reference
except ImportError:  # tests/ became a package
    from tests import reference

RTOL = 1e-5  # float32 against float64, relative to the largest reference value


def _close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17, 40])
def test_rows_dot_general_matches_float64(rows):
    """Every projection shape of a layer (one input axis, and o's two), at decode and prompt
    row counts, from the stored output-major arrays, as the layer programs call it."""
    rng = np.random.default_rng(rows)
    d, n, h, f = 48, 6, 8, 80
    tree = {
        "q": {"kernel": rng.standard_normal((d, n, h)).astype(np.float32)},
        "o": {"kernel": rng.standard_normal((n, h, d)).astype(np.float32)},
        "mlp": {"up": {"kernel": rng.standard_normal((d, f)).astype(np.float32)}},
        "attn_norm": {"scale": rng.standard_normal((d,)).astype(np.float32)},
    }
    stored = jax.jit(decoder.output_major)(tree)
    assert stored["q"]["kernel"].shape == (n, h, d) and stored["o"]["kernel"].shape == (d, n, h)
    assert stored["mlp"]["up"]["kernel"].shape == (f, d) and stored["attn_norm"]["scale"].shape == (d,)
    x_btd = rng.standard_normal((rows, 1, d)).astype(np.float32)
    a_btnh = rng.standard_normal((rows, 1, n, h)).astype(np.float32)

    @jax.jit
    def project(stored, x_btd, a_btnh):
        w = decoder.input_major(stored)
        dot = host_loop.rows_dot_general
        q = dot(x_btd, w["q"]["kernel"], (((2,), (0,)), ((), ())))
        o = dot(a_btnh, w["o"]["kernel"], (((2, 3), (0, 1)), ((), ())))
        up = dot(x_btd, w["mlp"]["up"]["kernel"], (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return q, o, up

    q, o, up = project(stored, x_btd, a_btnh)
    x64, a64 = x_btd.astype(np.float64), a_btnh.astype(np.float64)
    _close(q, np.einsum("btd,dnh->btnh", x64, tree["q"]["kernel"].astype(np.float64)))
    _close(o, np.einsum("btnh,nhd->btd", a64, tree["o"]["kernel"].astype(np.float64)))
    _close(up, x64 @ tree["mlp"]["up"]["kernel"].astype(np.float64))
    assert up.dtype == jnp.float32


def test_projections_read_the_stored_weights_in_place():
    """At a decode batch's row count, a layer program multiplies the stored arrays without
    copying them: nothing in the compiled program but its parameters (and their bitcasts)
    holds an array of a weight matrix's size."""
    cfg = shape("tiny-llama")
    layer = jax.tree_util.tree_map(lambda a: a[0], decoder.init_params(cfg, jax.random.key(0))["layers"])
    stored = jax.jit(decoder.output_major)(layer)
    x_btd = jnp.ones((8, 1, cfg.dim), cfg.dtype)
    attn_btnh = jnp.ones((8, 1, cfg.n_heads, cfg.head_dim), cfg.dtype)

    def finish(stored, x_btd, attn_btnh):
        return decoder.block_finish(cfg, decoder.input_major(stored), x_btd, attn_btnh, host_loop.rows_dot_general)

    hlo = jax.jit(finish).lower(stored, x_btd, attn_btnh).compile().as_text()
    sizes = {a.size for a in jax.tree_util.tree_leaves(stored) if a.ndim >= 2}
    made = []
    for name, dims, op in re.findall(r"%(\S+) = f32\[([\d,]*)\]\S* (\w[\w-]*)\(", hlo):
        if dims and math.prod(map(int, dims.split(","))) in sizes and op not in ("parameter", "bitcast"):
            made.append(f"{name} = {op}[{dims}]")
    assert not made, made


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_attend_blocks_matches_float64(batch):
    """Rows of one token over their pages, a block at a time: contexts of one key, of a whole
    block, across blocks and to the end of a table whose width is no multiple of a block;
    padding rows (position -1) beside them; grouped kv heads; pages in scattered order."""
    rng = np.random.default_rng(batch)
    layers, n_pages, z, kh, g, h, width = 2, 40, 4, 2, 3, 16, 9  # a block: 32 positions = 8 pages
    k_pages = rng.standard_normal((layers, n_pages, z, kh, h)).astype(np.float32)
    v_pages = rng.standard_normal((layers, n_pages, z, kh, h)).astype(np.float32)
    q = rng.standard_normal((batch, 1, kh * g, h)).astype(np.float32)
    table = np.stack([rng.permutation(np.arange(1, n_pages))[:width] for _ in range(batch)]).astype(np.int32)
    pos = np.array([0, width * z - 1, 31, 32, -1, 17, 5, 20][:batch], np.int32)
    assert 32 < width * z  # the table spans more than one block
    layer = np.int32(1)
    with _block_tokens(32):
        got = jax.jit(attention.attend_blocks)(q, k_pages, v_pages, layer, table, pos[:, None])
    for b in range(batch):
        if pos[b] < 0:
            assert np.isfinite(np.asarray(got[b])).all()
            continue
        n = int(pos[b]) + 1
        keys = k_pages[layer, table[b]].reshape(-1, kh, h)[:n].astype(np.float64)
        values = v_pages[layer, table[b]].reshape(-1, kh, h)[:n].astype(np.float64)
        for head in range(kh * g):
            want = reference.softmax(keys[:, head // g] @ q[b, 0, head].astype(np.float64)) @ values[:, head // g]
            _close(got[b, 0, head], want)


def test_attend_blocks_reads_only_the_blocks_the_longest_context_fills():
    """A page past the longest context's block is never read: NaN there changes nothing."""
    rng = np.random.default_rng(0)
    z, kh, h = 4, 1, 8
    k_pages = rng.standard_normal((1, 12, z, kh, h)).astype(np.float32)
    v_pages = k_pages.copy()
    table = np.arange(1, 11, dtype=np.int32)[None]  # 10 pages; a block: 8 pages (32 positions)
    q = rng.standard_normal((1, 1, kh, h)).astype(np.float32)
    pos = np.array([[20]], np.int32)
    with _block_tokens(32):
        clean = jax.jit(attention.attend_blocks)(q, k_pages, v_pages, np.int32(0), table, pos)
        k_pages[0, 9:], v_pages[0, 9:] = np.nan, np.nan  # the second block's pages
        poisoned = jax.jit(attention.attend_blocks)(q, k_pages, v_pages, np.int32(0), table, pos)
    np.testing.assert_array_equal(clean, poisoned)
    assert np.isfinite(np.asarray(clean)).all()


class _block_tokens:
    """Sets ``attention.BLOCK_TOKENS`` for a test (the tests' pages are small)."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def __enter__(self):
        self.saved, attention.BLOCK_TOKENS = attention.BLOCK_TOKENS, self.tokens

    def __exit__(self, *exc):
        attention.BLOCK_TOKENS = self.saved


def test_sampler_skips_alternatives_no_row_asks_for():
    """Rows that report no alternatives get zeros there; a batch where one row asks gets the
    top-k for every row; tokens and their log-probabilities are the same either way."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 300)).astype(np.float32))
    pos = jnp.arange(4, dtype=jnp.int32)
    plain = [SamplingParams(temperature=0.8, seed=3), SamplingParams()] * 2
    asking = [SamplingParams(temperature=0.8, seed=3, logprobs=5), SamplingParams()] * 2
    run = jax.jit(functools.partial(sample))
    a, b = run(logits, SamplingArrays.of(plain, 4), pos), run(logits, SamplingArrays.of(asking, 4), pos)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.asarray(a.top_ids).any() and not np.asarray(a.top_logprobs).any()
    log_softmax = jax.nn.log_softmax(logits, axis=-1)
    want_ids = np.argsort(-np.asarray(log_softmax), axis=-1)[:, : b.top_ids.shape[1]]
    np.testing.assert_array_equal(b.top_ids, want_ids)
