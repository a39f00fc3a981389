"""The CPU host loop's forms of a step: projections over output-major weights
(``host_loop.rows_dot_general``), decode attention by sums (``attention.attend_by_sums``) and
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
    """Every projection shape of a layer (one input axis, and o's two), at row counts on both
    sides of ROWS_DOT_MAX, from the stored output-major arrays, as the layer programs call it."""
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
    """At the row counts the sums take, a layer program multiplies the stored arrays without
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


@pytest.mark.parametrize("batch", [2, 5, 8])
def test_attend_by_sums_matches_float64(batch):
    """Rows of one token over their gathered context, padding masked, grouped kv heads."""
    rng = np.random.default_rng(batch)
    s, kh, g, h = 40, 2, 3, 16
    q = rng.standard_normal((batch, 1, kh * g, h)).astype(np.float32)
    k = rng.standard_normal((batch, s, kh, h)).astype(np.float32)
    v = rng.standard_normal((batch, s, kh, h)).astype(np.float32)
    lengths = rng.integers(1, s + 1, batch)
    mask = np.arange(s)[None, None, :] < lengths[:, None, None]  # [B, 1, S]
    got = jax.jit(attention.attend_by_sums)(q, k, v, mask)
    for b in range(batch):
        n = int(lengths[b])
        for head in range(kh * g):
            k64, v64 = k[b, :n, head // g].astype(np.float64), v[b, :n, head // g].astype(np.float64)
            want = reference.softmax(k64 @ q[b, 0, head].astype(np.float64)) @ v64
            _close(got[b, 0, head], want)


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
