"""Logical axis names and the default rules mapping them to mesh axes (no jax here).

Every mesh in jdisagg has the axes ``("pp", "tp")``. One rule table per instance (from its
mesh preset) maps logical axes to those mesh axes, so prefill's tensor parallelism (a
``pp=1, tp=N`` mesh) and decode's layer pipeline (``pp=M, tp=N``) are the same code reading
different data. ``jdisagg.model.sharding`` turns these names into jax shardings; the preset
reader checks them against a model without importing jax.
"""

from __future__ import annotations

from collections.abc import Mapping

from jdisagg.model.config import ModelConfig

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
