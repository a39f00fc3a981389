"""The layer loop run from the host: one compiled program per layer shape, called once per layer.

Inside a scanned layer loop XLA:CPU copies each layer's weights out of the stacked arrays
before its dots read them (``dynamic-slice`` fusions): on the 2-core CPU machines about a
third of a default-model decode step. Unrolling the loop removes the copies but multiplies
compile times (and XLA:CPU ran the unrolled decode step 4x slower). Here the runner slices the
weights into per-layer arrays once (``shared_layers``), and a step is three kinds of
small programs: embed, one layer (called for every layer, reading its own arrays; the cache
is donated, so its updates stay in place) and the head. On GPUs the scanned loop reads the
weights in place (cuBLAS matmuls, ``runtime.compile.XLA_OPTIONS``) and one program per step
launches less, so GPUs keep it; so do meshes of several devices (a pipeline's stages need
the stacked layout).

The per-layer arrays are stored output-major (``decoder.output_major``: a projection's
[D, F] weights as [F, D]), because of how XLA:CPU multiplies few rows: its matmul of 2-16
rows by [D, F] weights that stream from memory ran at 3-6 GB/s on the 2-core machines,
against 15-20 GB/s for one row. ``rows_dot_general`` multiplies the stored [F, D] weights
(the left operand) by the rows, a product [F, rows] kept in that layout: at 2-256 rows
the fastest of the forms measured (the weights by the rows, the rows by the weights, a
multiply and a sum over each output's row of weights; BENCHMARKS.md, CPU section). Each
layer program turns the stored arrays back into the usual shapes (``decoder.input_major``,
transposes that cancel against the ones here).

The decode rows attend a block of pages at a time (``attention.attend_blocks``), for as
many blocks as the longest context fills, so one program per batch bucket takes every
page-table width; the prefill head is the decode head's program over each prompt's last row.

``on_host`` is the one place that chooses.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.model import decoder
from jdisagg.model.config import ModelConfig
from jdisagg.model.sampler import Sampled, SamplingArrays, sample


def on_host(mesh: Mesh) -> bool:
    """Whether an instance on ``mesh`` runs its layer loop from the host: CPU, one device."""
    return mesh.size == 1 and mesh.devices.flat[0].platform == "cpu"


def run_layers(layer_program, layers: tuple[dict, ...], kv, x, *args):
    """Calls ``layer_program(layer, kv, x, *args, index) -> (x, kv)`` for every layer in turn."""
    for i, layer in enumerate(layers):
        x, kv = layer_program(layer, kv, x, *args, np.int32(i))
    return x, kv


def placed(sharding, *arrays) -> tuple:
    """``arrays``' shapes as placed on ``sharding``: what a step's ``programs`` compile for
    the inputs its ``__call__`` puts on the devices, so the calls find those programs."""
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in arrays)


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for projections (``rhs``: weights [inputs..., outputs...] that
    ``decoder.input_major`` made of output-major arrays; no batch dimensions) that reads the
    stored array in place, as the left operand of the matmul (see the module docstring)."""
    (lhs_in, rhs_in), batch = dimension_numbers
    n_in = len(rhs_in)
    if batch != ((), ()) or tuple(rhs_in) != tuple(range(n_in)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    lhs_in = tuple(a % lhs.ndim for a in lhs_in)
    rows_shape = [lhs.shape[a] for a in range(lhs.ndim) if a not in lhs_in]
    rows, inputs, outputs = int(np.prod(rows_shape)), int(np.prod(rhs.shape[:n_in])), rhs.shape[n_in:]
    x_mk = jnp.moveaxis(lhs, lhs_in, range(lhs.ndim - n_in, lhs.ndim)).reshape(rows, inputs)
    # The stored output-major array (this transpose cancels input_major's): no copy.
    w_nk = jnp.transpose(rhs, (*range(n_in, rhs.ndim), *range(n_in))).reshape(-1, inputs)
    # The weights as the matmul's left operand and the product kept [N, M] (the fence stops
    # XLA from folding the transpose back into the dot, which makes it the slower [M, K] x
    # [N, K] form).
    out_nm = jax.lax.dot_general(w_nk, x_mk, (((1,), (1,)), ((), ())), precision, preferred_element_type)
    out_mn = jax.lax.optimization_barrier(out_nm).T
    return out_mn.reshape(*rows_shape, *outputs)


def decode_attention(preset_choice: str) -> str:
    """How the host loop's decode rows attend, for the preset's ``decode_attention``: "dot"
    becomes "blocks" (``attention.attend_blocks``: as many blocks of pages as the longest
    context fills, so one program takes every page-table width)."""
    return "blocks" if preset_choice == "dot" else preset_choice


def head(cfg: ModelConfig, head_params: dict, x_b1d, s: SamplingArrays, pos_b) -> Sampled:
    """The host loop's head program (decode and prefill): the token after each row's last
    hidden state ``x_b1d`` (at ``pos_b``), as a call of one step samples it (``Sampled``
    [1, B]). ``head_params``: ``shared_head``'s."""
    params = {**head_params, "head": decoder.input_major(head_params["head"])}
    sampled = sample(decoder.logits(cfg, params, x_b1d[:, 0], rows_dot_general), s, pos_b + 1)
    return jax.tree_util.tree_map(lambda a: a[None], sampled)


def shared_layers(params: dict, mesh: Mesh) -> tuple[dict, ...]:
    """``params["layers"]`` as one output-major tree per layer (``decoder.output_major``),
    computed once per parameter tree: a colocated instance's
    prefill and decode runners share one set of per-layer arrays, on ``mesh`` (one device)."""
    placed = NamedSharding(mesh, PartitionSpec())
    return _shared(params["layers"], lambda: _output_major_layers(params["layers"], placed))


def shared_head(params: dict) -> dict:
    """What ``head`` reads: the embedding and
    the vocabulary projection output-major (an untied model's a copy; a tied model's
    embedding table already is), computed once per parameter tree as ``shared_layers``."""

    def build():
        return {"embed": params["embed"], "head": jax.jit(decoder.output_major)(params["head"])}

    return _shared(params["head"], build)


def _shared(tree, build):
    """``build()``, once for as long as ``tree``'s first leaf lives."""
    leaf = jax.tree_util.tree_leaves(tree)[0]
    key = (id(leaf), build.__code__)
    cached = _SHARED.get(key)
    if cached is None or cached[0]() is not leaf:
        cached = (weakref.ref(leaf), build())
        _SHARED[key] = cached
        for stale in [k for k, (ref, _) in _SHARED.items() if ref() is None]:
            del _SHARED[stale]  # parameter trees that are gone
    return cached[1]


_SHARED: dict[tuple, tuple] = {}


def _output_major_layers(stacked: dict, placed: NamedSharding) -> tuple[dict, ...]:
    """One output-major tree per layer of ``stacked``, placed on ``placed``. Sliced and
    transposed in host memory (where a CPU device's arrays are anyway): one copy per leaf,
    where hundreds of small eager programs took seconds."""
    host = jax.device_get(stacked)
    n = jax.tree_util.tree_leaves(host)[0].shape[0]
    return tuple(
        jax.device_put(decoder.output_major(jax.tree_util.tree_map(lambda a, i=i: a[i], host)), placed)
        for i in range(n)
    )
