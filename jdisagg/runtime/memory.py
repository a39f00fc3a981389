"""Device memory sizing: how many KV pages a decode instance's pool gets when its preset
leaves ``pages`` out, and what a colocated instance keeps beside it for its prefill.

``pages_that_fit`` is plain arithmetic over bytes, so the planner sizes placements for
hardware it is not running on with the same code the engine sizes its pools with;
``check_fits`` runs that arithmetic over a whole preset for a given memory per device (the
engine, before it places weights; tests, for chips that are not here).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import logging

from jdisagg.model import axes, decoder, sharding
from jdisagg.preset import InstanceSpec, MeshPreset
from jdisagg.runtime.buckets import token_buckets
from jdisagg.runtime.compile import compile_all
from jdisagg.sched.pages import pages_for

# Of the memory left after the weights (and a colocated prefill's share) when a preset leaves `pages` out.
KV_MEMORY_FRACTION = 0.85


def kv_bytes_per_token(cfg, spec: InstanceSpec) -> int:
    """Bytes of one token's KV (every layer, K and V) on each device of instance ``spec``."""
    kv_shards = spec.tp if cfg.n_kv_heads % spec.tp == 0 and spec.rules.get(axes.KV_HEADS) == "tp" else 1
    return cfg.kv_bytes_per_token(jnp.dtype(cfg.dtype).itemsize) // (spec.pp * kv_shards)


def prefill_reserve_bytes(cfg, spec: InstanceSpec, token_buckets: tuple[int, ...], call_tokens: int, scratch: int):
    """Device bytes a colocated instance's prefill needs beside its page pool.

    Prefill holds prefixes until decode pulls them: up to ``buffer_tokens``, plus those of
    the call that started below that limit (``call_tokens``), and that call's packed row
    while they are cut from it; plus the largest prefill program's ``scratch``.
    """
    tokens = spec.buffer_tokens + token_buckets[-1] + call_tokens
    return tokens * kv_bytes_per_token(cfg, spec) + scratch


def prefill_reserve(cfg, spec: InstanceSpec, runner) -> int:
    """``prefill_reserve_bytes`` for a built prefill runner: its largest program's scratch
    from the compiled memory analysis (the compiles are the ones warm-up would do)."""
    programs = runner.programs()
    compile_all(programs)  # as warm-up would (in threads where that helps); the analysis below reuses them
    scratch = max(p.compiled().memory_analysis().temp_size_in_bytes for p in programs)
    return prefill_reserve_bytes(cfg, spec, runner.token_buckets, runner.call_tokens(), scratch)


def _memory_stats(devices) -> list[dict] | None:
    """Each of this process's ``devices``' memory statistics (another process's devices
    report none here; an instance spanning hosts sizes itself from its own); None where
    some device reports none (CPU) or none is this process's."""
    stats = [d.memory_stats() for d in devices if d.process_index == jax.process_index()]
    if not stats or not all(stats) or not all("bytes_limit" in s for s in stats):
        return None
    return stats


def free_device_bytes(mesh) -> int | None:
    """The least memory left on any device of ``mesh`` (JAX's limit less what is in use);
    None where devices report no statistics (CPU)."""
    stats = _memory_stats(mesh.devices.flat)
    if stats is None:
        return None
    return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)


def pages_that_fit(free: int, cfg, spec: InstanceSpec, preset: MeshPreset, reserved: int = 0) -> int:
    """Pages in ``KV_MEMORY_FRACTION`` of ``free`` bytes per device after ``reserved``; raises
    ValueError when not even one request of ``max_seq_len`` fits."""
    per_page = preset.page_size * kv_bytes_per_token(cfg, spec)
    pages = max(0, int((free - reserved) * KV_MEMORY_FRACTION) // per_page)
    needed = pages_for(preset.max_seq_len, preset.page_size) + 1
    if pages < needed:
        raise ValueError(
            f"{preset.source}: {spec.where}: free memory holds {pages} KV pages"
            + (f" after {reserved / 2**20:,.1f} MiB for prefill" if reserved else "")
            + f"; one request needs {needed}"
        )
    return pages


def weight_bytes(cfg, spec: InstanceSpec) -> int:
    """Bytes of the parameters on each device of instance ``spec``: every leaf split over the
    mesh axes its instance's rules shard it on (the shardings ``sharding.param_shardings`` gives)."""
    abstract = decoder.abstract_params(cfg)
    sizes = {"pp": spec.pp, "tp": spec.tp}
    leaves = jax.tree_util.tree_leaves(abstract)
    leaf_axes = jax.tree_util.tree_leaves(sharding.param_axes(abstract), is_leaf=lambda x: isinstance(x, tuple))
    total = 0
    for leaf, names in zip(leaves, leaf_axes, strict=True):
        split = math.prod(sizes[m] for m in sharding.partition_spec(names, spec.rules) if m)
        total += leaf.size * leaf.dtype.itemsize // split
    return total


def check_fits(cfg, preset: MeshPreset, memory_per_device: int, scratch: int = 0) -> dict[str, int]:
    """Whether every instance of ``preset`` fits devices of ``memory_per_device`` bytes: its
    weights, a prefill's buffer and call (``prefill_reserve_bytes``, with ``scratch`` bytes for
    its largest program), and a decode pool of at least one ``max_seq_len`` request
    (``pages_that_fit``). Returns each decode instance's pages by ``spec.where``; raises
    ValueError naming the instance and the bytes that do not fit."""
    from jdisagg.plan.system import call_tokens, preset_length_buckets  # what the runners derive, checked against them

    buckets = preset_length_buckets(preset)
    gib, pages = 2**30, {}
    for spec in preset.instances:
        weights = weight_bytes(cfg, spec)
        at = f"{preset.source}: {spec.where} (pp={spec.pp}, tp={spec.tp})"
        if weights >= memory_per_device:
            raise ValueError(
                f"{at}: the weights take {weights / gib:.2f} GiB per device, more than its "
                f"{memory_per_device / gib:.2f} GiB; raise tp or pp"
            )
        reserved = 0
        if spec.runs_prefill:
            row = token_buckets(buckets, spec.token_budget)
            reserved = prefill_reserve_bytes(cfg, spec, row, call_tokens(spec, buckets), scratch)
            if weights + reserved > memory_per_device:
                raise ValueError(
                    f"{at}: weights {weights / gib:.2f} GiB + prefill buffer, call and scratch "
                    f"{reserved / gib:.2f} GiB exceed {memory_per_device / gib:.2f} GiB per device; "
                    "lower buffer_tokens or token_budget, or raise tp"
                )
        if spec.runs_decode:
            free = memory_per_device - weights
            pages[spec.where] = spec.pages or pages_that_fit(free, cfg, spec, preset, reserved)
            if spec.pages and spec.pages * preset.page_size * kv_bytes_per_token(cfg, spec) + reserved > free:
                raise ValueError(f"{at}: pages={spec.pages} do not fit beside the weights")
    return pages


def memory_per_device(devices) -> int | None:
    """The least memory JAX may use on any of ``devices``; None where they report none (CPU)."""
    stats = _memory_stats(devices)
    if stats is None:
        return None
    return min(s["bytes_limit"] for s in stats)


def auto_pages(cfg, mesh, spec: InstanceSpec, preset: MeshPreset, reserved: int = 0) -> int:
    """``pages_that_fit`` the decode devices' free memory now."""
    free = free_device_bytes(mesh)
    if free is None:
        raise ValueError(
            f"{preset.source}: {spec.where}.pages is required on this platform (no device memory statistics)"
        )
    pages = pages_that_fit(free, cfg, spec, preset, reserved)
    logging.info(
        "%s: %d KV pages (%.1f GiB per device)%s",
        spec.where,
        pages,
        pages * preset.page_size * kv_bytes_per_token(cfg, spec) / 2**30,
        f", {reserved / 2**20:,.0f} MiB kept for prefill" if reserved else "",
    )
    return pages
