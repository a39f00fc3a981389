"""Decode attention read straight from the page pool: a Pallas kernel (GPU; interpreted on CPU).

The plain path (``attention.PagedKV.read`` with ``decode_attention = "dot"``) gathers every
page of the batch's widest length bucket into a new array and then runs matmuls over it, so
each step writes and re-reads the whole context and reads the padding too. Here each program
walks only its request's pages, ``PAGES_PER_BLOCK`` at a time, loading the next block while
it works on the last, and keeps a running softmax (max, sum, weighted values) in float32, so
the context is read once.

Programs: one per (request, KV head, part of the context). The page table is cut into
``splits`` equal parts (flash-decoding; ``splits_for``); a part past a request's length reads
one block and uses none of it. With one part the program writes the normalized output. With
several, each writes its running max, sum and unnormalized values, and a small XLA reduction
combines the parts: a batch of few rows then still has enough programs to keep the device's
memory busy.

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

# Tuning, read at each call (so a benchmark may set them); the measured reasons are in
# BENCHMARKS.md (Llama-3-8B on an H200).
PAGES_PER_BLOCK = 2  # pages read per loop step (2 x 16 = 32 tokens)
NUM_WARPS = 2  # warps per program of an unsplit context
SPLIT_WARPS = 4  # warps per program of a split one (few rows: fewer, wider programs read faster)
NUM_STAGES = 3  # Triton's software pipelining; no effect measured on this loop
SPLITS = 0  # parts of the context per request; 0: splits_for picks
MIN_PROGRAMS = 1024  # programs (request x KV head x part) that splits_for aims for
_MIN_ROWS = 16  # matmul tiles need 16 rows: a KV head's query group is padded to this
_MASKED = -1e30


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(q_ref, table_ref, length_ref, k_ref, v_ref, *out_refs, pages_per_block: int, part_pages: int):
    """One request, one KV head, one part of its table: q [G, H], table [W], length [1],
    pool [L*P, Z, H] -> o [G, H] (one part), or o [G, H], peak [G], total [G] (several)."""
    g, h = q_ref.shape
    block = pages_per_block * k_ref.shape[1]
    first = pl.program_id(2) * part_pages  # this part's first slot of the table
    length = length_ref[0] - first * k_ref.shape[1]  # tokens of the request from there on
    n_blocks = jnp.clip(pl.cdiv(length, block), 0, part_pages // pages_per_block)
    q = q_ref[...]

    def load(i):
        pages = table_ref[pl.ds(first + i * pages_per_block, pages_per_block)]
        return k_ref[pages].reshape(block, h), v_ref[pages].reshape(block, h)

    def step(i, carry):
        # The next block's K and V are loaded before this block's are used, so a program
        # always has a load in flight. The last step loads its own block again (from L2).
        k, v, out, peak, total = carry
        k_next, v_next = load(jnp.minimum(i + 1, n_blocks - 1))
        scores = _dot(q, k.T)  # [G, block], float32
        position = i * block + jnp.arange(block, dtype=jnp.int32)
        scores = jnp.where(position[None, :] < length, scores, _MASKED)
        new_peak = jnp.maximum(peak, scores.max(axis=1))
        rescale = jnp.exp(peak - new_peak)
        probs = jnp.exp(scores - new_peak[:, None])
        total = total * rescale + probs.sum(axis=1)
        out = out * rescale[:, None] + _dot(probs.astype(v.dtype), v)
        return k_next, v_next, out, new_peak, total

    # A program with nothing to read (a padding row, a part past the length) still loads one
    # block before its loop of no steps.
    init = (jnp.zeros((g, h), jnp.float32), jnp.full((g,), _MASKED, jnp.float32), jnp.zeros((g,), jnp.float32))
    _, _, out, peak, total = jax.lax.fori_loop(0, n_blocks, step, (*load(0), *init))
    if len(out_refs) == 1:
        # A padding row (length 0) read nothing: its output is zeros, never NaN.
        out_refs[0][...] = (out / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_refs[0].dtype)
    else:
        o_ref, peak_ref, total_ref = out_refs
        o_ref[...], peak_ref[...], total_ref[...] = out, peak, total


def splits_for(programs: int, width: int, pages_per_block: int) -> int:
    """Parts of the context per request: ``SPLITS``, or with ``SPLITS = 0`` none for a batch
    of at least ``MIN_PROGRAMS / 2`` programs (request x KV head), which reads at the memory's
    rate unsplit, and for fewer the fewest (a power of two) that bring them to
    ``MIN_PROGRAMS``; at most one block of ``pages_per_block`` pages per part of a
    ``width``-page table."""
    most = max(1, width // pages_per_block)
    if SPLITS:
        return min(SPLITS, most)
    if programs >= MIN_PROGRAMS // 2:
        return 1
    splits = 1
    while programs * splits < MIN_PROGRAMS and splits * 2 <= most:
        splits *= 2
    return splits


def combine(out_bksgh: jax.Array, peak_bksg: jax.Array, total_bksg: jax.Array) -> jax.Array:
    """The softmax over all parts from each part's (unnormalized values, max, sum): [B, K, G, H]
    float32. A row whose parts all read nothing (padding) gives zeros."""
    top_bk1g = peak_bksg.max(axis=2, keepdims=True)
    weight_bksg = jnp.exp(peak_bksg - top_bk1g)  # 0 for a part that read nothing beside one that did
    values_bkgh = (out_bksgh * weight_bksg[..., None]).sum(axis=2)
    total_bkg = (total_bksg * weight_bksg).sum(axis=2)
    return values_bkgh / jnp.where(total_bkg > 0, total_bkg, 1.0)[..., None]


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
    splits: int | None = None,
) -> jax.Array:
    """Attention of one query token per row over its first ``lengths_b`` positions.

    q_bnh: [B, N, H], pre-scaled; k_pages, v_pages: [L, P, Z, K, H]; layer: int32 scalar;
    page_table: [B, W] (pages of ``layer``); lengths_b: [B] int32 (0 for padding rows).
    Returns [B, N, H]. Softmax in float32, the probabilities rounded to the values' dtype
    before they weight the values (as ``attention.attend``). The tuning arguments default to
    the module's ``PAGES_PER_BLOCK``, ``NUM_WARPS`` (``SPLIT_WARPS`` when split),
    ``NUM_STAGES`` and ``splits_for``.
    """
    pages_per_block = pages_per_block or PAGES_PER_BLOCK
    b, n, h = q_bnh.shape
    n_layers, n_pages, z, k, _ = k_pages.shape
    g = n // k
    splits = splits or splits_for(b * k, page_table.shape[1], pages_per_block)
    num_warps, num_stages = num_warps or (SPLIT_WARPS if splits > 1 else NUM_WARPS), num_stages or NUM_STAGES
    rows = max(_MIN_ROWS, g)
    q_bkgh = jnp.pad(q_bnh.reshape(b, k, g, h), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    chunk = splits * pages_per_block
    width = -(-page_table.shape[1] // chunk) * chunk
    table_bw = jnp.pad(page_table, ((0, 0), (0, width - page_table.shape[1])))  # pads with page 0
    table_bw = (table_bw + layer * n_pages).astype(jnp.int32)  # page ids in the [L * P, ...] view
    pool_shape = (n_layers * n_pages, z, k, h)
    per_head = pl.BlockSpec((None, None, rows, h), lambda i, j, s: (i, j, 0, 0))
    pool = pl.BlockSpec((n_layers * n_pages, z, None, h), lambda i, j, s: (0, 0, j, 0))
    if splits == 1:
        out_specs, out_shape = per_head, jax.ShapeDtypeStruct(q_bkgh.shape, q_bnh.dtype)
    else:
        parts = (b, k, splits, rows)
        out_specs = (
            pl.BlockSpec((None, None, None, rows, h), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
        )
        out_shape = (
            jax.ShapeDtypeStruct((*parts, h), jnp.float32),
            jax.ShapeDtypeStruct(parts, jnp.float32),
            jax.ShapeDtypeStruct(parts, jnp.float32),
        )
    out = pl.pallas_call(
        functools.partial(_kernel, pages_per_block=pages_per_block, part_pages=width // splits),
        grid=(b, k, splits),
        in_specs=[
            per_head,
            pl.BlockSpec((None, width), lambda i, j, s: (i, 0)),
            pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
            pool,
            pool,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=_interpret(),
        compiler_params=_compiler_params(num_warps, num_stages),
        name="jdisagg_paged_decode_attention",
    )(
        q_bkgh,
        table_bw,
        lengths_b.astype(jnp.int32)[:, None],
        k_pages.reshape(pool_shape),
        v_pages.reshape(pool_shape),
    )
    if splits > 1:
        out = combine(*out).astype(q_bnh.dtype)
    return out[:, :, :g].reshape(b, n, h)


def _interpret() -> bool:
    """Compiled on GPUs; elsewhere (CPU tests) run by the Pallas interpreter."""
    return jax.default_backend() != "gpu"


def _compiler_params(num_warps: int, num_stages: int):
    if _interpret():
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
