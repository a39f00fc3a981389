"""Sharding as data: the logical axes of every parameter and cache array, and jax
shardings from the rules in ``jdisagg.model.axes``. The model itself never mentions a mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.model.axes import EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MESH_AXES, MLP, POSITIONS, VOCAB

# Logical axes of parameter leaves, by (module, parameter) name; layer leaves get LAYERS in front.
_LEAF_AXES = {
    ("tokens", "embedding"): (VOCAB, EMBED),
    ("positions", "embedding"): (POSITIONS, EMBED),
    ("q", "kernel"): (EMBED, HEADS, HEAD_DIM),
    ("q", "bias"): (HEADS, HEAD_DIM),
    ("k", "kernel"): (EMBED, KV_HEADS, HEAD_DIM),
    ("k", "bias"): (KV_HEADS, HEAD_DIM),
    ("v", "kernel"): (EMBED, KV_HEADS, HEAD_DIM),
    ("v", "bias"): (KV_HEADS, HEAD_DIM),
    ("o", "kernel"): (HEADS, HEAD_DIM, EMBED),
    ("o", "bias"): (EMBED,),
    ("gate", "kernel"): (EMBED, MLP),
    ("up", "kernel"): (EMBED, MLP),
    ("down", "kernel"): (MLP, EMBED),
    ("fc1", "kernel"): (EMBED, MLP),
    ("fc1", "bias"): (MLP,),
    ("fc2", "kernel"): (MLP, EMBED),
    ("fc2", "bias"): (EMBED,),
    ("head", "lm_head"): (EMBED, VOCAB),
}


def _leaf_axes(path) -> tuple[str | None, ...]:
    names = [p.key for p in path]
    if names[-1] in ("scale", "bias") and "norm" in names[-2]:
        axes = (EMBED,)
    else:
        axes = _LEAF_AXES[tuple(names[-2:])]
    return (LAYERS, *axes) if names[0] == "layers" else axes


def param_axes(params) -> dict:
    """The logical axes of each leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_axes(path), params)


def partition_spec(axes: tuple[str | None, ...], rules: Mapping[str, str | None]) -> PartitionSpec:
    return PartitionSpec(*(rules.get(a) if a else None for a in axes))


def named_sharding(mesh: Mesh, axes, rules: Mapping[str, str | None]) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, rules))


def param_shardings(params, mesh: Mesh, rules: Mapping[str, str | None]) -> dict:
    """A NamedSharding for every leaf of ``params`` under ``rules``."""
    return jax.tree_util.tree_map(
        lambda axes: named_sharding(mesh, axes, rules), param_axes(params), is_leaf=lambda x: isinstance(x, tuple)
    )


def make_mesh(devices, pp: int, tp: int) -> Mesh:
    return Mesh(np.asarray(devices, dtype=object).reshape(pp, tp), MESH_AXES)
