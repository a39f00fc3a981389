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
rows against weights that stream from memory ran at 3-6 GB/s on the 2-core machines (it
repacks the weights), against 15-20 GB/s for one row. ``rows_dot_general`` writes such a
product as a multiply and a sum over each output's contiguous row of weights instead, which
reads the weights once at close to the one-row rate (BENCHMARKS.md, CPU section); one row
and more than ``ROWS_DOT_MAX`` rows stay matmuls (on the output-major weights, which XLA
reads in place). Each layer program turns the stored arrays back into the usual shapes
(``decoder.input_major``, transposes that cancel against the ones here).

``on_host`` is the one place that chooses.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.model import decoder

# The most rows a projection multiplies as ``rows_dot_general``'s multiply-and-sum; measured
# faster than XLA:CPU's matmul from 2 to 16 rows and slower at 1 and 64 (BENCHMARKS.md).
ROWS_DOT_MAX = 16


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
    stored array in place: 2 to ``ROWS_DOT_MAX`` rows of ``lhs`` as a multiply and a sum over
    each output's row of weights (see the module docstring), other row counts as a matmul
    against the rows of weights."""
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
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    if 2 <= rows <= ROWS_DOT_MAX:
        # Fenced, so that each product's rows are its own: XLA:CPU fuses the broadcast of
        # the rows into the multiply and sum, but writes out a broadcast that two products
        # share (k and v, gate and up) as an [N, M, K] array first.
        x_mk, w_nk = jax.lax.optimization_barrier((x_mk, w_nk))
        out_nm = jnp.sum(w_nk[:, None, :].astype(jnp.float32) * x_mk[None].astype(jnp.float32), axis=-1)
        out_mn = out_nm.T.astype(dtype)
    else:
        out_mn = jax.lax.dot_general(x_mk, w_nk, (((1,), (1,)), ((), ())), precision, preferred_element_type)
    return out_mn.reshape(*rows_shape, *outputs)


def decode_attention(preset_choice: str) -> str:
    """How the host loop's decode rows attend, for the preset's ``decode_attention``: "dot"
    becomes "sum" (``attention.attend_by_sums``, for the same reason as ``rows_dot_general``)."""
    return "sum" if preset_choice == "dot" else preset_choice


def shared_layers(params: dict, mesh: Mesh) -> tuple[dict, ...]:
    """``params["layers"]`` as one output-major tree per layer (``decoder.output_major``),
    computed once per parameter tree: a colocated instance's
    prefill and decode runners share one set of per-layer arrays, on ``mesh`` (one device)."""
    leaf = jax.tree_util.tree_leaves(params["layers"])[0]
    cached = _LAYERS.get(id(leaf))
    if cached is None or cached[0]() is not leaf:
        layers = _output_major_layers(params["layers"], NamedSharding(mesh, PartitionSpec()))
        cached = (weakref.ref(leaf), layers)
        _LAYERS[id(leaf)] = cached
        for key in [k for k, (ref, _) in _LAYERS.items() if ref() is None]:
            del _LAYERS[key]  # parameter trees that are gone
    return cached[1]


_LAYERS: dict[int, tuple] = {}


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
