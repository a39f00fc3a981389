"""Start-up compiles: every program shape, several at once where the platform allows, and
the program store that lets a restart skip them.

A runner's programs are ``Jitted`` functions (``jax.jit`` with a table of executables by
argument shapes). ``compile_all`` makes each program's executable and enters it in its
function's table, so the calls run it without tracing again. Where JAX's persistent
compilation cache is on (``platform.enable_compilation_cache``), each executable is also
written to the program store beside it (``<cache dir>/programs``), under a key of
everything that decides the program without tracing it: this package's source, the JAX,
jaxlib and flax versions, the devices, XLA and JAX settings, the function and its fixed
arguments, the argument shapes and shardings, and the package's module-level settings.
A later start reads the executables back: JAX's own cache needs each program traced and
lowered to find it, which was most of a warm CPU server start (4.6 s of 10.5;
BENCHMARKS.md). A function the key cannot describe (a lambda, a closure, an object
printed by address) is compiled every start, as before; an unreadable entry is compiled
and written again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import functools
import hashlib
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
from absl import logging

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


class Jitted:
    """``jax.jit(fn, **options)`` that runs, for arguments of the shapes ``compile_all`` was
    given, the executable it made or read back (see the module docstring)."""

    def __init__(self, fn: Callable, **options):
        self.fn, self.options = fn, options
        self.jit = jax.jit(fn, **options)
        self._made: dict = {}

    def __call__(self, *args):
        if self._made:
            made = self._made.get(_shapes(args))
            if made is not None:
                return made(*args)
        return self.jit(*args)  # also under a trace (_shapes gives None for tracers)

    def lower(self, *args):
        return self.jit.lower(*args)

    def eval_shape(self, *args):
        return self.jit.eval_shape(*args)

    def add(self, args: tuple, compiled) -> None:
        self._made[_shapes(args)] = compiled

    def made(self, args: tuple):
        return self._made.get(_shapes(args))


def _shapes(args: tuple) -> tuple:
    """What picks a ``Jitted``'s executable: the arguments' tree and their shapes and dtypes
    (a runner calls each function with its inputs placed one way; an executable called with
    inputs on other devices raises, it does not run there)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        return None
    return tree, tuple((getattr(a, "shape", ()), getattr(a, "dtype", type(a))) for a in leaves)


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and example arguments: one shape to compile at start-up."""

    label: str
    jitted: Callable  # a Jitted (its executable is kept and stored) or a jax.jit-wrapped function
    args: tuple

    def compiled(self):
        """The executable (``compile_all``'s, or compiled now)."""
        made = self.jitted.made(self.args) if isinstance(self.jitted, Jitted) else None
        return made if made is not None else self.jitted.lower(*self.args).compile()


def compile_all(programs: list[Program], done: Callable[[str], None] | None = None) -> float:
    """Compiles ``programs`` (or reads them from the program store), several at once;
    returns the seconds it took.

    XLA compiles outside the Python lock, so shapes compile in threads (not on GPUs, below).
    A later call of the same function on arguments of the same shapes and shardings runs
    the result.
    """
    start = time.perf_counter()
    store = ProgramStore.default()
    settings = _settings() if store else ""

    def one(p: Program) -> str:
        key = store.key(p, settings) if store and isinstance(p.jitted, Jitted) else None
        compiled = store.load(key) if key else None
        if compiled is None:
            compiled, fresh = _compile(p) if key else (p.jitted.lower(*p.args).compile(), False)
            if fresh:
                store.save(key, compiled)
        if isinstance(p.jitted, Jitted):
            p.jitted.add(p.args, compiled)
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


# An executable that JAX read from its persistent cache cannot be written again (on CPU
# the copy lacks the compiled code: calling it fails), so a program JAX's cache holds (after
# an upgrade of this package, whose store entries are then gone) is compiled once more with
# an option of another platform's compiler, which this platform's ignores but which is part
# of JAX's cache key: set to a number of its own each time, the compile is XLA's. JAX's cache
# keeps that copy too, never read again.
_FRESH_OPTIONS = {"cpu": "xla_gpu_autotune_level"}  # elsewhere: a CPU code generation option
_cache_hits = threading.local()


def _count_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits.count = getattr(_cache_hits, "count", 0) + 1


def _compile(p: Program):
    """The program compiled, and whether by XLA in this process (not read from JAX's cache):
    only such an executable can be stored."""
    _listen_for_cache_hits()
    lowered = p.jitted.lower(*p.args)
    _cache_hits.count = 0
    compiled = lowered.compile()
    if _cache_hits.count:
        name = _FRESH_OPTIONS.get(jax.default_backend(), "xla_cpu_parallel_codegen_split_count")
        fresh = {name: 1_000 + int.from_bytes(os.urandom(3), "little")}
        options = {**p.jitted.options.get("compiler_options", {}), **fresh}
        _cache_hits.count = 0
        compiled = lowered.compile(compiler_options=options)
    return compiled, _cache_hits.count == 0


@functools.cache
def _listen_for_cache_hits() -> None:
    jax.monitoring.register_event_listener(_count_cache_hit)


class ProgramStore:
    """Executables on disk, by a key computed without tracing (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = directory

    @classmethod
    def default(cls) -> ProgramStore | None:
        """The store beside JAX's persistent compilation cache; None where that is off."""
        cache = jax.config.jax_compilation_cache_dir
        if not cache or not jax.config.jax_enable_compilation_cache:
            return None
        return cls(Path(cache) / "programs")

    def key(self, p: Program, settings: str) -> str | None:
        """The program's key, or None where its function cannot be described. ``settings``:
        ``_settings()``, once for all programs of a ``compile_all``."""
        fn = _describe(p.jitted.fn)
        if fn is None:
            return None
        leaves, tree = jax.tree_util.tree_flatten(p.args)
        args = [
            (getattr(a, "shape", ()), str(getattr(a, "dtype", type(a))), repr(getattr(a, "sharding", None)))
            for a in leaves
        ]
        options = sorted(p.jitted.options.items())
        devices = _device_ids((leaves, p.jitted.fn, options))
        text = repr((_environment(), fn, options, repr(tree), args, devices, settings))
        if " at 0x" in text:  # an object printed by its address: no key holds from one start to the next
            return None
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, key: str):
        path = self.directory / key
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            from jax.experimental import serialize_executable

            serialized, in_tree, out_tree, device_ids = pickle.loads(blob)
            devices = {d.id: d for d in jax.devices()}
            return serialize_executable.deserialize_and_load(
                serialized, in_tree, out_tree, execution_devices=[devices[i] for i in device_ids]
            )
        except Exception as e:  # a damaged or foreign entry: compiled and written again
            logging.warning("program store: %s unreadable (%s); compiling", path, e)
            return None

    def save(self, key: str, compiled) -> None:
        """Writes the executable (a warning, never a failed start, where it cannot be)."""
        try:
            from jax.experimental import serialize_executable

            serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
            device_ids = [d.id for d in compiled._executable.xla_executable.local_devices()]
            blob = pickle.dumps((serialized, in_tree, out_tree, device_ids))
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            tmp.write_bytes(blob)
            tmp.replace(self.directory / key)  # whole entries only, also with several writers
        except Exception as e:
            logging.warning("program store: could not keep a program (%s)", e)


def _describe(fn) -> tuple | None:
    """A module-level function, or a functools.partial of one, by name and fixed arguments;
    None for anything else (its behaviour could hang on values no key sees)."""
    args, keywords = (), {}
    if isinstance(fn, functools.partial):
        fn, args, keywords = fn.func, fn.args, fn.keywords
    name = getattr(fn, "__qualname__", "")
    if not name or "<" in name or isinstance(fn, functools.partial):
        return None
    return fn.__module__, name, repr(args), repr(sorted(keywords.items()))


@functools.lru_cache(maxsize=1)
def _environment() -> tuple:
    """What decides every program of this process but its own function and arguments."""
    import flax
    import jaxlib

    source = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        source.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    backend = jax.devices()[0].client
    config = {k: v for k, v in jax.config.values.items() if "cache" not in k}
    return (
        source.hexdigest(),
        jax.__version__,
        jaxlib.__version__,
        flax.__version__,
        backend.platform,
        backend.platform_version,
        tuple((d.id, d.device_kind, d.process_index) for d in jax.devices()),
        jax.process_index(),
        jax.process_count(),
        os.environ.get("XLA_FLAGS", ""),
        repr(sorted(config.items())),
    )


def _settings() -> str:
    """This package's module-level settings (UPPER_CASE names of plain values) and functions
    (by the name of what each is now), as they are: tests and launchers change some
    (``attention.PROMPT_ATTENTION``, a kernel wrapped to record its calls) between programs."""
    out = []
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == "jdisagg" or name.startswith("jdisagg.")):
            continue
        for attr, value in sorted(vars(module).items()):
            if attr.isupper() and _plain(value):
                out.append(f"{name}.{attr}={value!r}")
            elif callable(value) and not isinstance(value, type):
                what = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value))}"
                out.append(f"{name}.{attr}:{what}")
    return "\n".join(out)


def _plain(value) -> bool:
    """Numbers, strings, enums, and tuples, lists and dicts of them (not caches of arrays)."""
    if isinstance(value, bool | int | float | str | bytes | enum.Enum | type(None)):
        return True
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return isinstance(value, tuple | list | frozenset) and all(_plain(v) for v in value)


def _device_ids(tree) -> tuple:
    """The devices of every sharding and mesh in ``tree`` (their printed forms name none)."""
    out = []

    def visit(x):
        if isinstance(x, jax.sharding.Mesh):
            out.append(tuple(int(i) for i in x.device_ids.flat))
        elif isinstance(x, jax.sharding.NamedSharding):
            visit(x.mesh)
        elif isinstance(x, jax.sharding.Sharding):
            out.append(tuple(sorted(d.id for d in x.device_set)))
        elif isinstance(getattr(x, "sharding", None), jax.sharding.Sharding):
            visit(x.sharding)
        elif isinstance(x, functools.partial):
            visit((x.args, x.keywords))
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            visit([getattr(x, f.name) for f in dataclasses.fields(x)])
        elif isinstance(x, list | tuple):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            visit(list(x.values()))

    visit(tree)
    return tuple(out)
