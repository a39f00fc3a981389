"""Attention and the two KV caches it runs against.

One attention function serves every step; steps differ only in where keys and values
live (each cache view's ``attend`` stores the new k, v and attends over its context):

* ``PromptKV`` (prefill): the context is the prompt itself (several prompts may be packed
  into one row). Each layer's k and v are also stored into ``[L, B, T, K, H]`` buffers,
  from which each request's prefix KV is cut.
* ``PagedKV`` (decode, and any step with past context): k and v live in a page pool
  ``[L, P, Z, K, H]``; ``page_table [B, P_max]`` maps a request's positions to pages.
  Page 0 is the null page: padding rows and unused table slots point at it, so their
  writes land somewhere harmless and their reads are masked out.
* ``MixedKV`` (chunked prefill): decode rows and a prompt chunk packed in one step.

``jdisagg.model.decoder.forward_layers`` runs the layers against any of them.

The kernels (flash or splash attention for prompt rows, ``decode_attention = "pallas"`` for
decode rows) are Pallas calls, each compiled for one device. On an instance of several
devices ``HeadSplit`` runs them under ``shard_map``: each device attends with its own
query heads and KV heads and its slice of the page pool (the tp split of the sharding
rules), and a pipeline's stages each on their own devices (``runtime.decode.pipeline``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from jdisagg.model import flash_kernel, paged_kernel, tpu_attention
from jdisagg.model.axes import HEADS, KV_HEADS
from jdisagg.model.config import ModelConfig

NULL_PAGE = 0
_MASKED = -1e30  # finite, so fully masked (padding) rows give garbage, never NaN
# How prompt rows (PromptKV) attend: "auto" runs the flash kernel on GPU and TPU instances
# and XLA's einsums elsewhere; "kernel" runs the kernel on any instance (interpreted off its
# platform: tests), "xla" the einsums everywhere. Shapes the kernel does not take, and
# instances whose heads the kernel cannot split (``head_split``), use the einsums.
# ``prompt_kernel`` is the one place that reads it.
PROMPT_ATTENTION = "auto"
# Whose kernels the prompt kernel and decode_attention = "pallas" run: "auto" the TPU ones
# (jdisagg.model.tpu_attention) on a TPU and the GPU ones (flash_kernel, paged_kernel)
# elsewhere; "tpu" the TPU ones anywhere (in Pallas' TPU interpreter off TPUs: tests).
KERNEL_PLATFORM = "auto"


def tpu_kernels() -> bool:
    """Whether the kernel paths run the TPU kernels (``KERNEL_PLATFORM``)."""
    return KERNEL_PLATFORM == "tpu" or jax.default_backend() == "tpu"


def causal_mask(q_pos_bt: jax.Array, k_pos_bs: jax.Array) -> jax.Array:
    """[B, T, S]: key s is visible to query t iff 0 <= pos(s) <= pos(t)."""
    return (k_pos_bs[:, None, :] >= 0) & (k_pos_bs[:, None, :] <= q_pos_bt[:, :, None])


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """Grouped-query attention; q is pre-scaled. Softmax in float32."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)  # query heads grouped by their kv head
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


# Keys a step of ``attend_blocks`` reads per row: 128 positions (8 pages of 16) measured
# fastest of 2, 4 and 8 pages on the 2-core CPU machines at 1-16 rows (BENCHMARKS.md).
BLOCK_TOKENS = 128


def attend_blocks(q_b1nh, k_pages, v_pages, layer, page_table_bp, pos_b1) -> jax.Array:
    """Rows of one token over their pages, a block of pages at a time, for only as many
    blocks as the batch's longest context fills (a loop with that many trips; softmax
    carried across blocks as a running maximum and sum). The CPU host loop's decode form
    (``PagedKV.decode_attention = "blocks"``): a gather of every page in the table and
    matmuls over all of it made the cost of a step that of the table's width, so each width
    needed its own program; here one program takes any width, and a step pays for the
    longest context, rounded up to ``BLOCK_TOKENS`` (BENCHMARKS.md, CPU section)."""
    b, _, n, h = q_b1nh.shape
    z, k = k_pages.shape[2], k_pages.shape[3]
    g = n // k
    per_block = max(1, BLOCK_TOKENS // z)  # pages
    table = jnp.pad(page_table_bp, ((0, 0), (0, -page_table_bp.shape[1] % per_block)), constant_values=NULL_PAGE)
    span = per_block * z
    q_bkgh = q_b1nh[:, 0].reshape(b, k, g, h)
    pos_b = pos_b1[:, 0]
    n_blocks = jnp.minimum((jnp.max(pos_b) + span) // span, table.shape[1] // per_block)

    def block(i, carry):
        top_bkg, total_bkg, out_bkgh = carry
        pages_bp = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, axis=1)
        k_bskh = k_pages[layer, pages_bp].reshape(b, span, k, h)
        v_bskh = v_pages[layer, pages_bp].reshape(b, span, k, h)
        scores_bskg = jnp.einsum("bkgh,bskh->bskg", q_bkgh, k_bskh, preferred_element_type=jnp.float32)
        visible_bs = i * span + jnp.arange(span, dtype=jnp.int32)[None] <= pos_b[:, None]
        scores_bskg = jnp.where(visible_bs[:, :, None, None], scores_bskg, _MASKED)
        new_top_bkg = jnp.maximum(top_bkg, scores_bskg.max(axis=1))
        scale_bkg = jnp.exp(top_bkg - new_top_bkg)
        probs_bskg = jnp.exp(scores_bskg - new_top_bkg[:, None])
        total_bkg = total_bkg * scale_bkg + probs_bskg.sum(axis=1)
        part_bkgh = jnp.einsum(
            "bskg,bskh->bkgh", probs_bskg.astype(v_bskh.dtype), v_bskh, preferred_element_type=jnp.float32
        )
        return new_top_bkg, total_bkg, out_bkgh * scale_bkg[..., None] + part_bkgh

    f32 = jnp.float32
    init = (jnp.full((b, k, g), _MASKED, f32), jnp.zeros((b, k, g), f32), jnp.zeros((b, k, g, h), f32))
    _, total_bkg, out_bkgh = jax.lax.fori_loop(0, n_blocks, block, init)
    # Padding rows (position -1) see no key: their garbage is finite, never NaN.
    out_bkgh = out_bkgh / jnp.maximum(total_bkg, jnp.finfo(f32).tiny)[..., None]
    return out_bkgh.reshape(b, 1, n, h).astype(v_pages.dtype)


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """How an instance's devices share the attention heads, for the kernels.

    ``mesh`` None: one device, and a kernel is called as it is. Otherwise a kernel runs under
    ``shard_map`` over ``mesh``: query heads and KV heads split over mesh axis ``axis`` (None:
    every device holds all of them), so each device attends with its own heads over its own
    slice of the page pool; page tables, lengths, positions and segments are whole on every
    device. Under a ``vmap`` with ``spmd_axis_name`` (a pipeline's stage axis) the mapped
    axis is split over that mesh axis too.
    """

    mesh: Mesh | None = None
    axis: str | None = None

    def run(self, kernel: Callable, head_dims: tuple[int | None, ...], out_dim: int, *args) -> jax.Array:
        """``kernel(*args)``, per device: ``head_dims[i]`` is the axis of ``args[i]`` that
        holds heads (None: the argument is whole on every device); ``out_dim`` the result's."""
        if self.mesh is None:
            return kernel(*args)

        def spec(arg, dim: int | None) -> PartitionSpec:
            return PartitionSpec(*(self.axis if i == dim else None for i in range(jnp.ndim(arg))))

        in_specs = tuple(spec(a, d) for a, d in zip(args, head_dims, strict=True))
        out_spec = PartitionSpec(*(None,) * out_dim, self.axis)
        # check_vma off: the Pallas calls declare no rule for how values vary over the mesh.
        return jax.shard_map(kernel, mesh=self.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


ONE_DEVICE = HeadSplit()


def head_split(mesh: Mesh, rules: Mapping[str, str | None]) -> HeadSplit | None:
    """How the kernels run on an instance over ``mesh`` sharded by ``rules``: None where they
    cannot run per device, because query heads and KV heads split over different mesh axes
    (a device's query heads would need KV heads that another device holds)."""
    if mesh.size == 1:
        return ONE_DEVICE
    if rules.get(HEADS) != rules.get(KV_HEADS):
        return None
    return HeadSplit(mesh, rules.get(HEADS))


def prompt_kernel(heads: HeadSplit | None = ONE_DEVICE) -> HeadSplit | None:
    """How prompt rows of an instance whose heads split as ``heads`` attend: with the flash
    kernel, run per device as the result says, or None: with einsums."""
    if PROMPT_ATTENTION == "xla" or heads is None:
        return None
    return heads if PROMPT_ATTENTION == "kernel" or jax.default_backend() in ("gpu", "tpu") else None


def prompt_attention(q_btnh, k_btkh, v_btkh, pos_bt, segment_bt, *, kernel: HeadSplit | None) -> jax.Array:
    """Causal attention of each token over the earlier tokens of its own segment (padding:
    position -1): the platform's flash kernel, per device as ``kernel`` says, where the shapes
    allow; einsums where they do not or ``kernel`` is None."""
    args = (q_btnh, k_btkh, v_btkh, pos_bt, segment_bt)
    heads_at = (2, 2, 2, None, None)  # [B, T, N, H], [B, T, K, H] x 2, [B, T] x 2
    if kernel is not None and tpu_kernels():
        if tpu_attention.prompt_supported(q_btnh):
            return kernel.run(tpu_attention.prompt_attention, heads_at, 2, *args)
    elif kernel is not None and flash_kernel.supported(q_btnh):
        return kernel.run(flash_kernel.attention, heads_at, 2, *args)
    same = segment_bt[:, :, None] == segment_bt[:, None, :]
    return attend(q_btnh, k_btkh, v_btkh, causal_mask(pos_bt, pos_bt) & same)


@struct.dataclass
class PromptKV:
    """Prefill cache: the prompts' own k and v, kept per layer as their prefix KV.

    Several prompts may share a row, packed end to end: ``segment_bt`` names each token's
    prompt, and a token sees only earlier tokens of its own.
    """

    k: jax.Array  # [L, B, T, K, H]
    v: jax.Array  # [L, B, T, K, H]
    segment_bt: jax.Array  # [B, T] int32
    # attend with the flash kernel, run per device so (``prompt_kernel``); None: einsums
    kernel: HeadSplit | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        batch: int,
        length: int,
        segment_bt: jax.Array | None = None,
        *,
        kernel: HeadSplit | None = ONE_DEVICE,
    ) -> PromptKV:
        """Zero buffers; one prompt per row unless ``segment_bt`` is given. ``kernel``: the
        instance's ``head_split`` (default: one device), which ``prompt_kernel`` turns into
        how its rows attend (asking again of its answer gives the same answer)."""
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        if segment_bt is None:
            segment_bt = jnp.zeros((batch, length), jnp.int32)
        kernel = prompt_kernel(kernel)
        return cls(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype), segment_bt, kernel)

    def attend(self, layer, q_btnh, k_btkh, v_btkh, pos_bt):
        kv = self.replace(k=self.k.at[layer].set(k_btkh), v=self.v.at[layer].set(v_btkh))
        return prompt_attention(q_btnh, k_btkh, v_btkh, pos_bt, self.segment_bt, kernel=self.kernel), kv


@struct.dataclass
class PagedKV:
    """Paged cache: pools of fixed-size pages and each request's page table."""

    k_pages: jax.Array  # [L, P, Z, K, H]
    v_pages: jax.Array  # [L, P, Z, K, H]
    page_table: jax.Array  # [B, P_max] int32; NULL_PAGE where unused
    # How rows of one token (decode) attend over their pages: "dot" (``attend``: gather,
    # then matmuls), "blocks" (``attend_blocks``: the CPU host loop's form of "dot") or
    # "pallas" (a kernel: ``paged_kernel`` reads the pages in place; on TPUs
    # ``tpu_attention``, for head dims it takes). Rows of several tokens use "dot".
    decode_attention: str = struct.field(pytree_node=False, default="dot")
    # How the kernel runs on the instance's devices (``head_split``; None: it cannot).
    heads: HeadSplit | None = struct.field(pytree_node=False, default=ONE_DEVICE)

    def write(self, layer, k_btkh, v_btkh, pos_bt) -> PagedKV:
        """Stores the new k, v at their positions (padding, pos -1, goes to the null page)."""
        z = self.k_pages.shape[2]
        valid = pos_bt >= 0
        page_bt = jnp.where(valid, jnp.take_along_axis(self.page_table, jnp.maximum(pos_bt, 0) // z, 1), NULL_PAGE)
        slot_bt = jnp.where(valid, pos_bt % z, 0)
        return self.replace(
            k_pages=self.k_pages.at[layer, page_bt, slot_bt].set(k_btkh),
            v_pages=self.v_pages.at[layer, page_bt, slot_bt].set(v_btkh),
        )

    def read(self, layer, q_btnh, pos_bt) -> jax.Array:
        """Attends over each request's pages of ``layer``."""
        if self.decode_attention == "pallas" and q_btnh.shape[1] == 1:
            if self.heads is None:
                raise ValueError(
                    'decode_attention = "pallas" runs per device over each device\'s heads: the sharding '
                    "rules must put heads and kv_heads on the same mesh axis"
                )
            kernel = tpu_attention if tpu_kernels() else paged_kernel
            if kernel is paged_kernel or tpu_attention.decode_supported(q_btnh):
                lengths_b = pos_bt[:, 0] + 1  # padding rows (pos -1) read nothing
                args = (q_btnh[:, 0], self.k_pages, self.v_pages, jnp.asarray(layer, jnp.int32), self.page_table)
                # [B, N, H], [L, P, Z, K, H] x 2, layer, table, lengths
                out_bnh = self.heads.run(kernel.decode_attention, (1, 3, 3, None, None, None), 1, *args, lengths_b)
                return out_bnh[:, None]
        if self.decode_attention == "blocks" and q_btnh.shape[1] == 1:
            return attend_blocks(q_btnh, self.k_pages, self.v_pages, layer, self.page_table, pos_bt)
        b, p_max = self.page_table.shape
        z = self.k_pages.shape[2]
        k_bpzkh = self.k_pages[layer, self.page_table]  # one gather: this layer's pages per request
        v_bpzkh = self.v_pages[layer, self.page_table]
        s = p_max * z
        k_ctx = k_bpzkh.reshape(b, s, *k_bpzkh.shape[-2:])
        v_ctx = v_bpzkh.reshape(b, s, *v_bpzkh.shape[-2:])
        k_pos_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return attend(q_btnh, k_ctx, v_ctx, causal_mask(pos_bt, k_pos_bs))

    def attend(self, layer, q_btnh, k_btkh, v_btkh, pos_bt):
        """Writes the new k, v at their positions, then attends over each request's pages."""
        kv = self.write(layer, k_btkh, v_btkh, pos_bt)
        return kv.read(layer, q_btnh, pos_bt), kv


@struct.dataclass
class MixedKV:
    """Decode rows and one prefill chunk in one step (chunked prefill), over one page pool.

    The step's tokens are packed into a single row ``[1, B + C]``: B decode tokens (one per
    request) then a C-token chunk of one prompt. Projections and MLP run on the packed row;
    attention runs per group against the shared pool.
    """

    k_pages: jax.Array  # [L, P, Z, K, H]
    v_pages: jax.Array  # [L, P, Z, K, H]
    decode_table: jax.Array  # [B, P_max]
    chunk_table: jax.Array  # [1, P_max]
    decode_attention: str = struct.field(pytree_node=False, default="dot")  # as PagedKV's
    heads: HeadSplit | None = struct.field(pytree_node=False, default=ONE_DEVICE)  # as PagedKV's

    def attend(self, layer, q_1tnh, k_1tkh, v_1tkh, pos_1t):
        b = self.decode_table.shape[0]
        # One write for the whole packed row (a single scatter keeps the pool update in
        # place): each token's row of the page table is its decode request's, or the chunk's.
        rows_t = jnp.concatenate(
            [self.decode_table, jnp.broadcast_to(self.chunk_table, (q_1tnh.shape[1] - b, self.chunk_table.shape[1]))]
        )
        packed = PagedKV(self.k_pages, self.v_pages, rows_t, self.decode_attention, self.heads).write(
            layer, k_1tkh[0][:, None], v_1tkh[0][:, None], pos_1t[0][:, None]
        )

        def rows(x):  # the decode part as B rows of one token
            return x[0, :b].reshape(b, 1, *x.shape[2:])

        out_d = packed.replace(page_table=self.decode_table).read(layer, rows(q_1tnh), rows(pos_1t))
        out_c = packed.replace(page_table=self.chunk_table).read(layer, q_1tnh[:, b:], pos_1t[:, b:])
        out = jnp.concatenate([out_d.reshape(1, b, *out_d.shape[2:]), out_c], axis=1)
        return out, self.replace(k_pages=packed.k_pages, v_pages=packed.v_pages)
