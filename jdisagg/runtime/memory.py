"""Device memory sizing: how many KV pages a decode instance's pool gets when its preset
leaves ``pages`` out, and what a colocated instance keeps beside it for its prefill.

``pages_that_fit`` is plain arithmetic over bytes, so the planner sizes placements for
hardware it is not running on with the same code the engine sizes its pools with.
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import logging

from jdisagg.model import axes
from jdisagg.preset import InstanceSpec, MeshPreset
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
    scratch = max(p.jitted.lower(*p.args).compile().memory_analysis().temp_size_in_bytes for p in programs)
    return prefill_reserve_bytes(cfg, spec, runner.token_buckets, runner.call_tokens(), scratch)


def free_device_bytes(mesh) -> int | None:
    """The least memory left on any device of ``mesh`` (JAX's limit less what is in use);
    None where devices report no statistics (CPU)."""
    stats = [d.memory_stats() for d in mesh.devices.flat]
    if not all(stats) or not all("bytes_limit" in s for s in stats):
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
