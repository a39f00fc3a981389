"""Attention on TPUs through JAX's own Pallas TPU kernels (run by Pallas' TPU interpreter elsewhere).

The TPU counterparts of ``paged_kernel`` (decode rows over the page pool) and
``flash_kernel`` (packed prompt rows), with the same arguments and results, so
``attention`` swaps them by platform (``attention.KERNEL_PLATFORM``):

* ``decode_attention``: ``jax.experimental.pallas.ops.tpu.paged_attention``. That kernel takes
  a pool laid out ``[K, pages, Z, H]`` (one KV head's pages contiguous); jdisagg's pool is
  ``[L, P, Z, K, H]`` for every platform (page writes, prefix inserts, transfers and the
  pipeline split all use it). The conversion: each call gathers the batch's pages of one layer
  into the kernel's layout, ``[K, B * W, Z, H]``, and hands the kernel the table
  ``arange(B * W)``. That gather moves the same bytes as the "dot" path's, so on a TPU this
  kernel buys no memory traffic yet: a pool stored in the kernel's layout would. The kernel
  rounds K and V to bfloat16 before its matmuls (pools of a bfloat16 model lose nothing) and
  weights the values with float32 probabilities.
  ``ragged_paged_attention`` would also take rows of several tokens, but JAX 0.10.2's TPU
  interpreter cannot run it (a reshaped scratch ref), so nothing here could test it.
* ``prompt_attention``: splash attention (``...ops.tpu.splash_attention``), one MQA kernel per
  KV head (its query group as the kernel's heads), vmapped over KV heads and rows. Its
  causal mask counts token indices and its segment ids keep prompts apart; in a packed
  prefill row positions restart at 0 at each prompt and padding has its own segment (-1),
  so that is the exact mask ``attention.prompt_attention`` computes from positions.

Shapes as in ``paged_kernel`` and ``flash_kernel``: q pre-scaled by 1/sqrt(H). Block sizes
are the kernels' lane width or small multiples of it, not tuned on a TPU (none has run this).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

LANES = 128  # a TPU vector register's minor dimension: head dims and splash blocks are multiples
PAGES_PER_BLOCK = 8  # pages the decode kernel reads per step (8 x 16 = 128 tokens)
PROMPT_BLOCK = 512  # splash attention's query and key block, at most


def interpreted() -> bool:
    """Off TPUs the kernels run in Pallas' TPU interpreter (tests on CPU)."""
    return jax.default_backend() != "tpu"


def _interpret_mode():
    """``paged_attention`` takes no ``interpret`` argument: this context runs every Pallas call
    traced under it in the TPU interpreter."""
    return pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()) if interpreted() else contextlib.nullcontext()


def decode_supported(q_bnh: jax.Array) -> bool:
    """Whether the decode kernel takes these shapes (a head dim of whole lanes)."""
    return q_bnh.shape[-1] % LANES == 0


def decode_attention(
    q_bnh: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    lengths_b: jax.Array,
    *,
    pages_per_block: int | None = None,
) -> jax.Array:
    """Attention of one query token per row over its first ``lengths_b`` positions; [B, N, H].

    q_bnh: [B, N, H], pre-scaled; k_pages, v_pages: [L, P, Z, K, H]; layer: int32 scalar;
    page_table: [B, W] (pages of ``layer``); lengths_b: [B] int32 (0 for padding rows, which
    read nothing and come out zero).
    """
    b, w = page_table.shape
    per_block = min(pages_per_block or PAGES_PER_BLOCK, w)
    width = -(-w // per_block) * per_block
    table_bw = jnp.pad(page_table, ((0, 0), (0, width - w)))  # pads with the null page

    def kernel_layout(pages):  # [L, P, Z, K, H] -> this layer's pages of the batch, [K, B * W, Z, H]
        z, k, h = pages.shape[2:]
        gathered_bwzkh = pages[layer, table_bw]
        return gathered_bwzkh.transpose(3, 0, 1, 2, 4).reshape(k, b * width, z, h)

    compact_bw = jnp.arange(b * width, dtype=jnp.int32).reshape(b, width)
    with _interpret_mode():
        return paged_attention(
            q_bnh,
            kernel_layout(k_pages),
            kernel_layout(v_pages),
            lengths_b.astype(jnp.int32),
            compact_bw,
            pages_per_compute_block=per_block,
        )


def prompt_block(t: int) -> int:
    """Splash attention's block for rows of ``t`` tokens: the largest multiple of ``LANES``
    up to ``PROMPT_BLOCK`` that divides ``t`` (halving from it); 0 when none does."""
    block = PROMPT_BLOCK
    while block >= LANES and t % block:
        block //= 2
    return block if block >= LANES else 0


def prompt_supported(q_btnh: jax.Array) -> bool:
    """Whether the prompt kernel takes these shapes (rows and head dim of whole lanes)."""
    return prompt_block(q_btnh.shape[1]) > 0 and q_btnh.shape[-1] % LANES == 0


@functools.cache
def _splash_kernel(t: int, group: int, interpret: bool):
    """The MQA splash kernel for rows of ``t`` tokens and ``group`` query heads per KV head."""
    block = prompt_block(t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * group)
    with jax.ensure_compile_time_eval():  # its block tables as constants, not the first caller's tracers
        return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def prompt_attention(q_btnh, k_btkh, v_btkh, pos_bt, segment_bt) -> jax.Array:
    """Causal attention of each token over the earlier tokens of its own segment; [B, T, N, H].

    Rows pack prompts end to end, each from position 0 (padding: position -1, segment -1);
    ``pos_bt`` is implied by that packing and unused.
    """
    del pos_bt
    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    kernel = _splash_kernel(t, n // k, interpreted())
    q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)  # each KV head's query group
    k_bkth, v_bkth = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)

    def row(q_kgth, k_kth, v_kth, segment_t):
        ids = splash.SegmentIds(q=segment_t, kv=segment_t)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_kgth, k_kth, v_kth, ids)

    out_bkgth = jax.vmap(row)(q_bkgth, k_bkth, v_bkth, segment_bt.astype(jnp.int32))
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
