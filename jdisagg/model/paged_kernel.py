"""Decode attention read straight from the page pool: a Pallas kernel (GPU; interpreted on CPU).

The plain path (``attention.PagedKV.read`` with ``decode_attention = "dot"``) gathers every
page of the batch's widest length bucket into a new array and then runs matmuls over it, so
each step writes and re-reads the whole context and reads the padding too. Here one program
per (request, KV head) walks only that request's pages, ``PAGES_PER_BLOCK`` at a time, and
keeps a running softmax (max, sum, weighted values) in float32, so the context is read once
and nothing is written but the output.

The pool keeps its layout ``[L, P, Z, K, H]``: the kernel sees it as ``[L * P, Z, K, H]`` (a
free reshape) and reads page ``layer * P + page``, so the layer loop slices nothing. One
program reads one KV head's rows of a page (``Z`` runs of ``H`` contiguous values).

Used for rows of one token (``preset.decode_attention = "pallas"``). On an instance of
several devices ``attention.HeadSplit`` runs it under ``shard_map``: each device over its own
KV heads (and their query heads) and its pipeline stage's layers. That sharded use has run
only in the Pallas interpreter on CPU, not compiled on a GPU (``launch/gpu_check.py`` checks it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Tuned on an H200 (Llama-3-8B, B = 256, context 2047; BENCHMARKS.md): 4 pages per step with 3
# pipeline stages read the pages at 2.5 TB/s, 8 pages with 2 stages at 2.25. Read at each call,
# so a benchmark may set them.
PAGES_PER_BLOCK = 4  # pages read per loop step (4 x 16 = 64 tokens)
NUM_WARPS = 4
NUM_STAGES = 3
_MIN_ROWS = 16  # matmul tiles need 16 rows: a KV head's query group is padded to this
_MASKED = -1e30


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(q_ref, table_ref, length_ref, k_ref, v_ref, o_ref, *, pages_per_block: int):
    """One request, one KV head: q [G, H], table [P], length [1], pool [L*P, Z, H] -> o [G, H]."""
    g, h = q_ref.shape
    block = pages_per_block * k_ref.shape[1]
    length = length_ref[0]
    q = q_ref[...]

    def step(i, carry):
        out, peak, total = carry
        pages = table_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block, h)
        v = v_ref[pages].reshape(block, h)
        scores = _dot(q, k.T)  # [G, block], float32
        position = i * block + jnp.arange(block, dtype=jnp.int32)
        scores = jnp.where(position[None, :] < length, scores, _MASKED)
        new_peak = jnp.maximum(peak, scores.max(axis=1))
        rescale = jnp.exp(peak - new_peak)
        probs = jnp.exp(scores - new_peak[:, None])
        total = total * rescale + probs.sum(axis=1)
        out = out * rescale[:, None] + _dot(probs.astype(v.dtype), v)
        return out, new_peak, total

    init = (jnp.zeros((g, h), jnp.float32), jnp.full((g,), _MASKED, jnp.float32), jnp.zeros((g,), jnp.float32))
    out, _, total = jax.lax.fori_loop(0, pl.cdiv(length, block), step, init)
    # A padding row (length 0) read nothing: its output is zeros, never NaN.
    o_ref[...] = (out / jnp.where(total > 0, total, 1.0)[:, None]).astype(o_ref.dtype)


def decode_attention(
    q_bnh: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    lengths_b: jax.Array,
    *,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Attention of one query token per row over its first ``lengths_b`` positions.

    q_bnh: [B, N, H], pre-scaled; k_pages, v_pages: [L, P, Z, K, H]; layer: int32 scalar;
    page_table: [B, P_max] (pages of ``layer``); lengths_b: [B] int32 (0 for padding rows).
    Returns [B, N, H]. Softmax in float32, the probabilities rounded to the values' dtype
    before they weight the values (as ``attention.attend``). The tuning arguments default to
    the module's ``PAGES_PER_BLOCK``, ``NUM_WARPS`` and ``NUM_STAGES``.
    """
    pages_per_block = pages_per_block or PAGES_PER_BLOCK
    num_warps, num_stages = num_warps or NUM_WARPS, num_stages or NUM_STAGES
    b, n, h = q_bnh.shape
    n_layers, n_pages, z, k, _ = k_pages.shape
    g = n // k
    rows = max(_MIN_ROWS, g)
    q_bkgh = jnp.pad(q_bnh.reshape(b, k, g, h), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    width = -(-page_table.shape[1] // pages_per_block) * pages_per_block
    table_bp = jnp.pad(page_table, ((0, 0), (0, width - page_table.shape[1])))  # pads with page 0
    table_bp = (table_bp + layer * n_pages).astype(jnp.int32)  # page ids in the [L * P, ...] view
    pool_shape = (n_layers * n_pages, z, k, h)
    per_head = pl.BlockSpec((None, None, rows, h), lambda i, j: (i, j, 0, 0))
    pool = pl.BlockSpec((n_layers * n_pages, z, None, h), lambda i, j: (0, 0, j, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, pages_per_block=pages_per_block),
        grid=(b, k),
        in_specs=[
            per_head,
            pl.BlockSpec((None, width), lambda i, j: (i, 0)),
            pl.BlockSpec((None, 1), lambda i, j: (i, 0)),
            pool,
            pool,
        ],
        out_specs=per_head,
        out_shape=jax.ShapeDtypeStruct(q_bkgh.shape, q_bnh.dtype),
        interpret=_interpret(),
        compiler_params=_compiler_params(num_warps, num_stages),
        name="jdisagg_paged_decode_attention",
    )(
        q_bkgh,
        table_bp,
        lengths_b.astype(jnp.int32)[:, None],
        k_pages.reshape(pool_shape),
        v_pages.reshape(pool_shape),
    )
    return out[:, :, :g].reshape(b, n, h)


def _interpret() -> bool:
    """Compiled on GPUs; elsewhere (CPU tests) run by the Pallas interpreter."""
    return jax.default_backend() != "gpu"


def _compiler_params(num_warps: int, num_stages: int):
    if _interpret():
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
