"""Process-level JAX set-up shared by the command-line entry points."""

from __future__ import annotations

import os

CPU_DEVICES = 8


def simulate_cpu_devices(n: int = CPU_DEVICES) -> None:
    """On a host without accelerators, let XLA expose ``n`` CPU devices (the CPU presets use 8).

    Must run before JAX initializes its backends; harmless on GPU and TPU hosts, where
    the flag only affects the (unused) CPU platform.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def enable_compilation_cache(directory: str | None = None) -> None:
    """Persist compiled programs across restarts (``$JDISAGG_CACHE``/xla or ~/.cache/jdisagg/xla).

    Where ``$JAX_COMPILATION_CACHE_DIR`` is set, JAX's own settings (that directory, and its
    ``JAX_PERSISTENT_CACHE_*`` variables) are left as they are."""
    import jax

    from jdisagg.weights.default import default_cache_dir

    if directory is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", directory or str(default_cache_dir() / "xla"))
    # Every program, however quick to compile: on the 2-core CPU machines the default server
    # has 46 programs, most under half a second each, and reading all from the cache took its
    # warm start from 21-26 s to 12-13 s (BENCHMARKS.md).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
