"""Test setup: JAX on CPU with 8 simulated devices, so meshes and transfers are real.

The session shares one persistent compilation cache, in-process and with the processes tests
start (they inherit the environment; ``platform.enable_compilation_cache`` leaves a set
``JAX_COMPILATION_CACHE_DIR`` alone): the tests build the same tiny models on the same presets
many times, and a program compiled once is read back after. Compile-time assertions are not
affected: ``jax.log_compiles`` reports a program that misses the in-memory caches either way.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="jdisagg-test-xla-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
