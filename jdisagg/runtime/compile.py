"""Start-up compiles: every program shape, several at once where the platform allows."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable

import jax

MAX_COMPILE_THREADS = 16
# XLA options of every runner program. Without Triton GEMM fusions the matmuls are cuBLAS
# calls, and XLA then reads each layer's weights in place inside the scanned layer loop
# instead of copying them out of the stacked arrays first: on an H200 a Llama-3-8B decode step
# at batch 8 took 8.5 ms instead of 14.6, a 2,048-token prefill 51.6 instead of 58.0, at
# scanned compile times (BENCHMARKS.md). A GPU option; other platforms ignore it.
# Without the dot merger q, k and v stay three matmuls over the same rows: merged, XLA copied
# their weights into one matrix in every layer of every step (0.78 ms of a Llama-3-8B decode
# step at batch 8 on an H200, which ran 7.30 -> 6.88 ms without it; BENCHMARKS.md).
XLA_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_disable_hlo_passes": "dot-merger"}


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
    parallel = jax.default_backend() != "gpu"
    workers = max(1, min(len(programs), os.cpu_count() or 1, MAX_COMPILE_THREADS)) if parallel else 1
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        for label in pool.map(one, programs):
            if done:
                done(label)
    return time.perf_counter() - start
