"""Process-level JAX set-up shared by the command-line entry points, and start-up compiles."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable

CPU_DEVICES = 8
MAX_COMPILE_THREADS = 16


def simulate_cpu_devices(n: int = CPU_DEVICES) -> None:
    """On a host without accelerators, let XLA expose ``n`` CPU devices (the CPU presets use 8).

    Must run before JAX initializes its backends; harmless on GPU and TPU hosts, where
    the flag only affects the (unused) CPU platform.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def enable_compilation_cache(directory: str | None = None) -> None:
    """Persist compiled programs across restarts (``$JDISAGG_CACHE``/xla or ~/.cache/jdisagg/xla)."""
    import jax

    from jdisagg.weights.default import default_cache_dir

    jax.config.update("jax_compilation_cache_dir", directory or str(default_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and example arguments: one shape to compile at start-up."""

    label: str
    jitted: Callable  # a jax.jit-wrapped function
    args: tuple


def compile_all(programs: list[Program], done: Callable[[str], None] | None = None) -> float:
    """Compiles ``programs``, several at once; returns the seconds it took.

    XLA compiles outside the Python lock, so shapes compile in threads (not on GPUs, below).
    A later call of the same function on arguments of the same shapes and shardings reuses
    the result.
    """
    start = time.perf_counter()

    def one(p: Program) -> str:
        p.jitted.lower(*p.args).compile()
        return p.label

    # On GPUs one at a time: XLA autotunes a program's matmuls by timing them on the device,
    # and concurrent autotuning on an H200 ran each compile several times slower and out of
    # device memory beside an auto-sized page pool.
    import jax

    parallel = jax.default_backend() != "gpu"
    workers = max(1, min(len(programs), os.cpu_count() or 1, MAX_COMPILE_THREADS)) if parallel else 1
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        for label in pool.map(one, programs):
            if done:
                done(label)
    return time.perf_counter() - start
