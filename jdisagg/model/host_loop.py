"""The layer loop run from the host: one compiled program per layer shape, called once per layer.

Inside a scanned layer loop XLA:CPU copies each layer's weights out of the stacked arrays
before its dots read them (``dynamic-slice`` fusions): on the 2-core CPU machines about a
third of a default-model decode step. Unrolling the loop removes the copies but multiplies
compile times (and XLA:CPU ran the unrolled decode step 4x slower). Here the runner slices the
weights into per-layer arrays once (``decoder.unstack_layers``), and a step is three kinds of
small programs: embed, one layer (called for every layer, reading its own arrays; the cache
is donated, so its updates stay in place) and the head. On GPUs the scanned loop reads the
weights in place (cuBLAS matmuls, ``runtime.compile.XLA_OPTIONS``) and one program per step
launches less, so GPUs keep it; so do meshes of several devices (a pipeline's stages need
the stacked layout).

``on_host`` is the one place that chooses.
"""

from __future__ import annotations

import weakref

import jax
import numpy as np
from jax.sharding import Mesh


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


def shared_unstack(params: dict, unstack) -> tuple[dict, ...]:
    """``unstack(params["layers"])``, computed once per parameter tree: a colocated instance's
    prefill and decode runners share one set of per-layer arrays."""
    leaf = jax.tree_util.tree_leaves(params["layers"])[0]
    cached = _UNSTACKED.get(id(leaf))
    if cached is None or cached[0]() is not leaf:
        cached = (weakref.ref(leaf), unstack(params["layers"]))
        _UNSTACKED[id(leaf)] = cached
        for key in [k for k, (ref, _) in _UNSTACKED.items() if ref() is None]:
            del _UNSTACKED[key]  # parameter trees that are gone
    return cached[1]


_UNSTACKED: dict[int, tuple] = {}
