"""Sharding as data: logical axis names, the logical axes of every array, and the rules
that map logical axes to mesh axes.

Every mesh in jdisagg has the axes ``("pp", "tp")``. One rule table (per instance, from
its mesh preset) maps logical axes to those mesh axes, so prefill's tensor parallelism
(a ``pp=1, tp=N`` mesh) and decode's layer pipeline (``pp=M, tp=N``) are the same code
reading different data. The model itself never mentions a mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.config import ModelConfig

# Logical axes.
LAYERS, VOCAB, EMBED, POSITIONS = "layers", "vocab", "embed", "positions"
HEADS, KV_HEADS, HEAD_DIM, MLP = "heads", "kv_heads", "head_dim", "mlp"
BATCH, LENGTH, PAGES, PAGE_SLOT = "batch", "length", "pages", "page_slot"

MESH_AXES = ("pp", "tp")
DEFAULT_RULES: Mapping[str, str | None] = {LAYERS: "pp", HEADS: "tp", KV_HEADS: "tp", MLP: "tp", VOCAB: "tp"}

# Logical axes of the cache arrays.
PAGES_AXES = (LAYERS, PAGES, PAGE_SLOT, KV_HEADS, HEAD_DIM)  # k or v page pool [L, P, Z, K, H]
PREFIX_AXES = (LAYERS, LENGTH, KV_HEADS, HEAD_DIM)  # one request's prefix KV [L, T, K, H]
PROMPT_KV_AXES = (LAYERS, BATCH, LENGTH, KV_HEADS, HEAD_DIM)  # a prefill batch's KV [L, B, T, K, H]

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


def logical_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of each logical axis that a mesh axis may shard."""
    return {
        LAYERS: cfg.n_layers,
        HEADS: cfg.n_heads,
        KV_HEADS: cfg.n_kv_heads,
        MLP: cfg.ffn_dim,
        VOCAB: cfg.vocab_size,
        EMBED: cfg.dim,
        HEAD_DIM: cfg.head_dim,
    }


def check_divisible(cfg: ModelConfig, axis_sizes: Mapping[str, int], rules: Mapping[str, str | None], where: str):
    """Raises ValueError naming ``where.<mesh axis>`` when a sharded model axis does not divide."""
    sizes = logical_sizes(cfg)
    for logical, mesh_axis in rules.items():
        if mesh_axis is None or logical not in sizes:
            continue
        n = axis_sizes.get(mesh_axis, 1)
        if sizes[logical] % n:
            raise ValueError(
                f"{where}.{mesh_axis}={n} does not divide the model's {logical} ({sizes[logical]}); "
                f"choose a {mesh_axis} that divides {sizes[logical]}"
            )


def make_mesh(devices, pp: int, tp: int) -> Mesh:
    return Mesh(np.asarray(devices, dtype=object).reshape(pp, tp), MESH_AXES)
