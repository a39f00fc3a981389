"""Prefill attention over packed rows: a flash-attention Pallas kernel (GPU; interpreted on CPU).

The plain path (``attention.attend`` with a mask) computes every score of a row, T x T per
head, writes them to memory, and masks most of them away: on an H200 it took 0.64 ms per
Llama-3-8B layer at T = 2048, a quarter of the prefill. Here one program per (query block,
row, query head) keeps its ``BLOCK_Q`` queries on chip, walks the key blocks a running
softmax in float32 needs, and writes only the output.

A row may pack several prompts end to end (``segment_bt`` names each token's prompt; a token
sees the earlier tokens of its own prompt). Within a prompt positions count up by one from
0 (padding: position -1), so the first key a query block can see is the first token of the
earliest prompt it holds (``index - position``, least over its valid queries) and the last
is its own last query: a program visits only the key blocks between, so a packed row pays
for each prompt's own causal block of attention, not for the row's. The mask inside a block
is the exact one (same prompt, key position at most the query's, key not padding).

Shapes: q [B, T, N, H] pre-scaled by 1/sqrt(H), k and v [B, T, K, H] (N a multiple of K),
positions and segments [B, T] int32; T a multiple of the block (``block_for``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Tuned on an H200 (Llama-3-8B heads, BENCHMARKS.md): blocks of 64 with 4 warps beat 128 with
# 8 at T = 512, 2,048 and 4,096, single or packed.
BLOCK = 64  # queries per program and keys per loop step, at most
MIN_BLOCK = 16  # matmul tiles need 16 rows
NUM_WARPS = 4
NUM_STAGES = 2
_MASKED = -1e30  # finite: a block where a row sees nothing adds exp2(0) terms that the next rescale zeroes
_LOG2_E = math.log2(math.e)


def block_for(t: int, largest: int = BLOCK) -> int:
    """The block size for rows of ``t`` tokens: the largest power of two <= ``largest`` that
    divides ``t``; 0 when under ``MIN_BLOCK`` (the kernel cannot run)."""
    b = largest
    while b >= MIN_BLOCK and t % b:
        b //= 2
    return b if b >= MIN_BLOCK else 0


def supported(q_btnh: jax.Array) -> bool:
    """Whether the kernel takes these shapes (row length a multiple of 16, head dim a power of
    two of at least 16)."""
    h = q_btnh.shape[-1]
    return block_for(q_btnh.shape[1]) > 0 and h >= MIN_BLOCK and h & (h - 1) == 0


def _kernel(q_ref, k_ref, v_ref, pos_ref, seg_ref, o_ref, *, block_q: int, block_k: int):
    """One query block of one row and head: q [BQ, H]; k, v [T, H]; pos, seg [T] -> o [BQ, H]."""
    t, h = k_ref.shape
    start = pl.program_id(0) * block_q
    q = q_ref[...]
    q_pos = pos_ref[pl.ds(start, block_q)]
    q_seg = seg_ref[pl.ds(start, block_q)]
    q_index = start + jnp.arange(block_q, dtype=jnp.int32)
    valid = q_pos >= 0
    # Key blocks this query block can see: from its earliest prompt's first token to its last query.
    first = jnp.maximum(jnp.min(jnp.where(valid, q_index - q_pos, t)), 0)
    last = jnp.max(jnp.where(valid, q_index, -1))

    def step(j, carry):
        out, peak, total = carry
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        k_pos, k_seg = pos_ref[keys], seg_ref[keys]
        seen = (k_seg[None, :] == q_seg[:, None]) & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
        scores = jnp.where(seen, scores * _LOG2_E, _MASKED)
        new_peak = jnp.maximum(peak, scores.max(axis=1))
        rescale = jnp.exp2(peak - new_peak)
        probs = jnp.exp2(scores - new_peak[:, None])
        total = total * rescale + probs.sum(axis=1)
        v = v_ref[keys, :]
        out = out * rescale[:, None] + jax.lax.dot_general(
            probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return out, new_peak, total

    init = (
        jnp.zeros((block_q, h), jnp.float32),
        jnp.full((block_q,), _MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    # No valid query: first = t, last = -1, and the loop runs no step (the block writes zeros).
    out, _, total = jax.lax.fori_loop(first // block_k, (last + block_k) // block_k, step, init)
    # Padding queries beside valid ones average what the block read: finite garbage, never NaN.
    o_ref[...] = (out / jnp.where(total > 0, total, 1.0)[:, None]).astype(o_ref.dtype)


def attention(
    q_btnh: jax.Array,
    k_btkh: jax.Array,
    v_btkh: jax.Array,
    pos_bt: jax.Array,
    segment_bt: jax.Array,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal attention of each token over the earlier tokens of its own segment; [B, T, N, H].

    ``interpret``: None runs the compiled kernel on GPUs and the Pallas interpreter elsewhere.
    """
    b, t, n, h = q_btnh.shape
    g = n // k_btkh.shape[2]
    bq = block_for(t, block)
    if not bq:
        raise ValueError(f"rows of {t} tokens: the kernel needs a multiple of {MIN_BLOCK}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, r, j: (r, i, j, 0))
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, r, j: (r, 0, j // g, 0))
    row_spec = pl.BlockSpec((None, t), lambda i, r, j: (r, 0))
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        functools.partial(_kernel, block_q=bq, block_k=bq),
        grid=(t // bq, b, n),
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_btnh.shape, q_btnh.dtype),
        interpret=interpret,
        compiler_params=params,
        name="jdisagg_prompt_flash_attention",
    )(q_btnh, k_btkh, v_btkh, pos_bt.astype(jnp.int32), segment_bt.astype(jnp.int32))
