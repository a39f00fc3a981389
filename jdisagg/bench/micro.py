"""Micro-benchmarks: each phase's step against the device limits measured in the same run.

    python -m jdisagg.bench micro                      # all benchmarks, default model and mesh
    python -m jdisagg.bench.micro --model tiny-llama --mesh cpu-tp4-pp2tp2 --which prefill,decode

Benchmarks (``--which``, a comma list; the ceilings always run: every ratio needs them):

* ``ceilings``: one device's matmul FLOP/s (an N^3 jitted product in the model's dtype)
  and copy bandwidth (an elementwise op over a large array, bytes read plus written).
* ``prefill``: the jitted prefill step of the preset's first prefill instance for B
  prompts of T tokens, packed into one row as the server packs them. Useful FLOPs per call
  (P_layer = parameters of the stacked layers, D model dim, V vocabulary, N heads, H head
  dim, L layers)::

      2 * P_layer * B * T  +  2 * B * D * V  +  2 * L * N * H * T^2 * B

  (weights once per token; the vocabulary projection for the last token of each prompt;
  attention QK^T and PV, 4 * L * T^2 * N * H per prompt, halved because it is causal; the
  program computes every masked score of the packed row too, and its padding to the token
  bucket, so it does more than this useful work.)
  Ratio: achieved FLOP/s over (matmul FLOP/s x the instance's device count).
* ``decode``: one jitted decode step of the preset's first decode instance (its pool, or
  ``--decode_pages``; sized from free memory as the engine does when the preset leaves it
  out) for B requests at position S, each with its own S + 1 positions of distinct pages
  holding non-zero KV. Fewest bytes read per step (W = bytes of the layer weights, the
  vocabulary projection and the final norm; the B embedding rows are left out; K kv heads)::

      W  +  2 * L * K * H * itemsize * S * B

  Ratio: achieved bytes/s over (copy bandwidth x the instance's device count). The note
  says how the step reads the pages: with ``decode_attention = "dot"`` it gathers the
  runner's width bucket of pages per request; with ``"pallas"`` the kernel reads each
  request's own pages in place.
* ``transfer``: ``reshard.transfer`` of a real prefix (made by the prefill runner)
  into the decode instance's prefix layout, and a plain ``jax.device_put`` of the same
  prefix between the two meshes, each over a ``device_put`` of the same bytes from one
  device to one device (first prefill device -> first decode device). The note says
  whether the two layouts split the prefix the same way.
* ``pp``: decode tokens/s of pipelined instances against one device, in one run (runners
  built from the same model, each alone on the host's first devices): pp=1 (the preset's
  decode attention) at batch B; pp=2 at B with one step per call (the pipeline filled and
  drained every step); pp=2 with ``--pp_steps`` steps per call (each micro-batch's tokens fed
  back on the devices: steady state) at B and at 2B (the rows of two devices); pp=2 x tp=2
  likewise at 2B and 4B on four devices or more. The limit is the bandwidth floor
  ``rows * copy bandwidth * devices / bytes per step``; the note gives tokens/s per device
  and the ratio to pp=1. Every case attends as the preset says (``--decode_attention``).

Timing (``measure``): two warm-up calls, then two medians over ``--repeats`` samples.
``ms``: calls issued back to back for about 0.1 s and waited for once, per call: the
device's time (or the host's, where dispatch is slower). ``blocked ms``: single calls each
waited for, which adds the host's wait on the device (about 1 ms per call on the lent H200
machines: a third off the apparent matmul rate). Ratios use ``ms``. Steps are called
with their inputs already on the devices and greedy sampling; the host copy of the sampled
tokens is left out. Progress goes to stderr, one table per benchmark to stdout, every row
to ``--json_out`` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jdisagg import cards, platform
from jdisagg.model import axes, decoder, sharding
from jdisagg.preset import DECODE_ATTENTION, PIPELINE_STEPS, InstanceSpec, MeshPreset, load_preset
from jdisagg.runtime.buckets import length_buckets
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.instances import decode_runner, prefill_runner
from jdisagg.runtime.memory import auto_pages
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.pages import pages_for
from jdisagg.sched.params import SamplingParams
from jdisagg.transfer import reshard

BENCHMARKS = ("ceilings", "prefill", "decode", "transfer", "pp")
# Prefill batches (B, T) holding 128..8192 prompt tokens; kept when they fit the instance's budget.
PREFILL_SHAPES = ((1, 128), (1, 512), (4, 128), (1, 2048), (4, 512), (8, 512), (16, 256), (2, 2048), (4, 2048))
WARMUP = 2
MAX_BATCH = 64


class _Flag:
    """A flag read by this module. Defined here unless another module of the process already
    defined the name (``--model`` and ``--mesh`` are common); then that definition is read,
    and this module's default applies when the flag is not on the command line."""

    def __init__(self, define: Callable, name: str, default, help: str):
        self.name, self.default = name, default
        if name not in flags.FLAGS:
            define(name, default, help)

    @property
    def value(self):
        flag = flags.FLAGS[self.name]
        return flag.value if flag.present else self.default


_WHICH = _Flag(flags.DEFINE_list, "which", list(BENCHMARKS), f"Benchmarks to run: {', '.join(BENCHMARKS)}.")
_MODEL = _Flag(flags.DEFINE_string, "model", "", "Model card or shape; default llama3-8b (tiny-llama on CPU).")
_MESH = _Flag(flags.DEFINE_string, "mesh", "", "Mesh preset; default gpu-N for N GPUs (cpu-tp4-pp2tp2 on CPU).")
_PREFILL_SHAPES = _Flag(
    flags.DEFINE_list, "prefill_shapes", [], "Prefill batches as BxT; default those of 128..8192 tokens that fit."
)
_DECODE_BATCHES = _Flag(flags.DEFINE_list, "decode_batches", [], "Decode batches; default the instance's buckets.")
_DECODE_CONTEXTS = _Flag(flags.DEFINE_list, "decode_contexts", ["128", "512", "2048"], "Decode context lengths.")
_TRANSFER_LENGTHS = _Flag(flags.DEFINE_list, "transfer_lengths", ["128", "512", "2048"], "Prefix lengths to move.")
_DECODE_PAGES = _Flag(
    flags.DEFINE_integer, "decode_pages", 0, "KV pages of the decode benchmark's pool; 0: the preset's (or sized)."
)
_PP_BATCH = _Flag(flags.DEFINE_integer, "pp_batch", 0, "Batch of the pp benchmark; 0: the decode max_batch.")
_PP_CONTEXT = _Flag(flags.DEFINE_integer, "pp_context", 512, "Context tokens per request in the pp benchmark.")
_PP_STEPS = _Flag(
    flags.DEFINE_integer, "pp_steps", 0, "Decode steps per call of the pp benchmark's pipelines; 0: PIPELINE_STEPS."
)
_REPEATS = _Flag(flags.DEFINE_integer, "repeats", 10, "Timed calls per measurement (the median is reported).")
_JSON_OUT = _Flag(flags.DEFINE_string, "json_out", "", "Write every row (and the ceilings) as JSON to this file.")
_UNROLL = _Flag(
    lambda name, default, help: flags.DEFINE_enum(name, default, ["preset", "true", "false"], help),
    "unroll_layers",
    "preset",
    "Unroll the layer loop (true/false); default: the mesh preset's unroll_layers.",
)
_DECODE_ATTENTION = _Flag(
    lambda name, default, help: flags.DEFINE_enum(name, default, ["preset", *DECODE_ATTENTION], help),
    "decode_attention",
    "preset",
    f"Decode attention over pages ({', '.join(DECODE_ATTENTION)}); default: the mesh preset's decode_attention.",
)


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run; empty fields take defaults from the backend and the preset."""

    which: tuple[str, ...] = BENCHMARKS
    model: str = ""  # "": llama3-8b on accelerators, tiny-llama on CPU
    mesh: str = ""  # "": gpu-N for N GPUs, cpu-tp4-pp2tp2 on CPU
    prefill_shapes: tuple[tuple[int, int], ...] = ()  # (): PREFILL_SHAPES within the instance's budget
    decode_batches: tuple[int, ...] = ()  # (): the decode instance's batch buckets
    decode_contexts: tuple[int, ...] = (128, 512, 2048)  # each at most the preset's max_seq_len - 1
    decode_pages: int = 0  # 0: the preset's pool, or sized from free memory as the engine does
    transfer_lengths: tuple[int, ...] = (128, 512, 2048)  # those within the largest length bucket run
    pp_batch: int = 0  # 0: the decode instance's max_batch
    pp_context: int = 512
    pp_steps: int = 0  # 0: preset.PIPELINE_STEPS
    repeats: int = 10
    json_out: str = ""
    unroll_layers: bool | None = None  # None: the preset's
    decode_attention: str = ""  # "": the preset's


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: ``seconds`` from back-to-back calls waited for once per batch (the
    device's time, or the host's dispatch time where that is longer); ``blocked`` from calls
    waited for one by one, which adds the host's wait for the device to each call."""

    seconds: float
    blocked: float


@dataclasses.dataclass
class Row:
    """One measurement. ``achieved`` and ``limit`` are in ``unit``; ``ratio = achieved / limit``."""

    bench: str
    name: str
    shape: str
    timing: dataclasses.InitVar[Timing]
    achieved: float
    limit: float
    unit: str
    devices: int = 1
    flops: float = 0.0  # useful FLOPs per call (prefill, ceilings)
    bytes: int = 0  # fewest bytes read per call (decode, pp) or moved (transfer, ceilings)
    tokens: int = 0  # tokens per call (prefill: prompt tokens; decode, pp: one per request)
    note: str = ""
    time_ms: float = dataclasses.field(init=False)  # Timing.seconds
    blocked_ms: float = dataclasses.field(init=False)  # Timing.blocked

    def __post_init__(self, timing: Timing):
        self.time_ms, self.blocked_ms = timing.seconds * 1e3, timing.blocked * 1e3

    @property
    def ratio(self) -> float:
        return self.achieved / self.limit

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """One device's limits, measured in this run."""

    matmul_flops: float  # FLOP/s
    copy_bytes: float  # bytes/s, read plus written


def _progress(message: str) -> None:
    print(f"jdisagg.bench.micro: {message}", file=sys.stderr, flush=True)


def measure(call: Callable[[], object], repeats: int, warmup: int = WARMUP) -> Timing:
    """Medians over ``repeats`` samples after ``warmup`` calls. A back-to-back batch runs
    enough calls to last about 0.1 s (0.01 s on CPU), so the wait at its end (about 1 ms
    on the lent GPU machines) adds little; each call's outputs replace the last one's."""
    batch_s = 0.01 if jax.default_backend() == "cpu" else 0.1
    for _ in range(warmup):
        jax.block_until_ready(call())
    repeats = max(repeats, 1)
    blocked = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        blocked.append(time.perf_counter() - start)
    one = float(np.median(blocked))
    calls = min(max(math.ceil(batch_s / one), 1), MAX_BATCH)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()  # calls on the same devices run in order: the last one ends the batch
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
    return Timing(float(np.median(per_call)), one)


# ---- ceilings ----------------------------------------------------------------------------


def measure_ceilings(dtype: str, repeats: int) -> tuple[Ceilings, list[Row]]:
    """Matmul FLOP/s and copy bandwidth of device 0, in ``dtype``, on random data."""
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    n = 512 if on_cpu else 8192
    copy_elems = (32 << 20 if on_cpu else 2 << 30) // jnp.dtype(dtype).itemsize  # 32 MiB / 2 GiB read
    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    with jax.default_device(device):
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        x = jax.random.normal(kc, (copy_elems,), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    scale = jax.jit(lambda x: x * 1.5 + 0.5)  # reads x once, writes one array of its size
    _progress(f"ceilings: {n}^3 {dtype} matmul, {x.nbytes / 2**20:.0f} MiB copy on {device}")
    t_mm, t_copy = measure(lambda: matmul(a, b), repeats), measure(lambda: scale(x), repeats)
    flops, moved = 2.0 * n**3, 2 * x.nbytes
    tflops, gbps = flops / t_mm.seconds / 1e12, moved / t_copy.seconds / 1e9
    rows = [  # a ceiling is its own limit
        Row("ceilings", "matmul", f"{n}x{n}x{n} {dtype}", t_mm, tflops, tflops, "TFLOP/s", flops=flops),
        Row("ceilings", "copy", f"{x.nbytes >> 20} MiB {dtype}", t_copy, gbps, gbps, "GB/s", bytes=moved),
    ]
    return Ceilings(flops / t_mm.seconds, moved / t_copy.seconds), rows


# ---- set-up shared by the benchmarks -------------------------------------------------------


def default_model() -> str:
    return "tiny-llama" if jax.default_backend() == "cpu" else "llama3-8b"


def default_mesh() -> str:
    backend, n = jax.default_backend(), jax.device_count()
    if backend == "cpu":
        return "cpu-tp4-pp2tp2"
    if backend == "gpu":
        return f"gpu-{8 if n >= 8 else 4 if n >= 4 else 2 if n >= 2 else 1}"
    raise ValueError(f"no default mesh preset for {n} {backend} device(s): pass --mesh")


def weight_bytes_read(cfg, abstract: dict) -> int:
    """Bytes of the weights a decode step reads: the layers, the head (final norm and
    vocabulary projection; the embedding table when tied). Embedding rows are left out."""
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((abstract["layers"], abstract["head"])))
    if cfg.tie_embeddings:
        table = abstract["embed"]["tokens"]["embedding"]
        nbytes += table.size * table.dtype.itemsize
    return nbytes


class Bench:
    """The model and preset under test, the measured ceilings, and the weights placed so far."""

    def __init__(self, options: Options):
        self.options = options
        self.preset: MeshPreset = load_preset(options.mesh or default_mesh())
        if options.unroll_layers is not None:
            self.preset = dataclasses.replace(self.preset, unroll_layers=options.unroll_layers)
        if options.decode_attention:
            self.preset = dataclasses.replace(self.preset, decode_attention=options.decode_attention)
        self.model = cards.open_model(cards.load_card(options.model or default_model()))
        self.cfg = self.model.cfg
        self.devices = jax.devices()
        self.preset.validate(self.cfg, len(self.devices), self.devices[0].platform)
        self.abstract = decoder.abstract_params(self.cfg)
        self.itemsize = jnp.dtype(self.cfg.dtype).itemsize
        self.layer_params = sum(x.size for x in jax.tree_util.tree_leaves(self.abstract["layers"]))
        self.weight_bytes = weight_bytes_read(self.cfg, self.abstract)
        # A chunked preset has no prefill instance: its prompts ride on decode steps.
        self.prefill_spec = self.preset.prefill[0] if self.preset.prefill else None
        self.decode_spec = self.preset.decode[0]
        preset = self.preset
        self.length_buckets = preset.length_buckets or length_buckets(preset.max_seq_len, preset.page_size)
        self.ceilings: Ceilings | None = None
        self._prefill: PrefillRunner | None = None
        self._weights: dict | None = None  # the first placement, source of the others

    def place(self, devices: list, pp: int, tp: int, rules):
        """A mesh over ``devices`` and the weights on it. The first placement loads them
        (``LoadedModel.place``, as the engine does); later ones copy that one device to device."""
        mesh = sharding.make_mesh(devices, pp, tp)
        shardings = sharding.param_shardings(self.abstract, mesh, rules)
        if self._weights is None:
            self._weights = self.model.place(shardings)
            return mesh, self._weights
        return mesh, jax.tree_util.tree_map(lambda w, s: reshard.reshard((w,), s)[0], self._weights, shardings)

    @property
    def prefill_runner(self) -> PrefillRunner:
        """The preset's first prefill instance, built once (as the engine builds it)."""
        if self._prefill is None:
            spec = self.prefill_spec
            mesh, params = self.place([self.devices[i] for i in spec.devices], spec.pp, spec.tp, spec.rules)
            self._prefill = prefill_runner(self.cfg, params, mesh, spec, self.preset, self.length_buckets)
        return self._prefill

    def decode_runner(self, spec: InstanceSpec, n_pages: int = 0) -> DecodeRunner:
        """A decode instance of ``spec`` (as the engine builds it) with a pool of ``n_pages``
        (0: the preset's, or sized from free memory) filled with non-zero KV."""
        mesh, params = self.place([self.devices[i] for i in spec.devices], spec.pp, spec.tp, spec.rules)
        n_pages = n_pages or spec.pages or auto_pages(self.cfg, mesh, spec, self.preset)
        runner = decode_runner(self.cfg, params, mesh, spec, self.preset, n_pages)
        fill_pages(runner)
        return runner

    def decode_bytes(self, batch: int, context: int) -> int:
        return self.weight_bytes + self.cfg.kv_bytes_per_token(self.itemsize) * context * batch


def fill_pages(runner: DecodeRunner) -> None:
    """Non-zero KV in every page (a cheap sine pattern), so the step reads real data. Written
    in place of the pools (donated): a pool sized from free memory leaves no room for a copy."""
    shape, dtype = runner.k_pages.shape, runner.k_pages.dtype

    def pattern(pages, phase):
        del pages  # its buffer is reused for the result
        x = sum(jax.lax.broadcasted_iota(jnp.float32, shape, d) * (0.7 + 0.37 * d) for d in range(len(shape)))
        return jnp.sin(x + phase).astype(dtype)

    fill = jax.jit(pattern, donate_argnums=0, keep_unused=True, out_shardings=runner.pages_sharding)
    runner.k_pages, runner.v_pages = fill(runner.k_pages, 0.0), fill(runner.v_pages, 1.0)


def replicated(mesh, *arrays):
    return jax.device_put(arrays, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# ---- prefill ---------------------------------------------------------------------------------


def prefill_flops(b: Bench, batch: int, length: int) -> float:
    cfg = b.cfg
    dense = 2.0 * b.layer_params * batch * length + 2.0 * batch * cfg.dim * cfg.vocab_size
    attention = 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * length**2 * batch  # causal half of 4 L T^2 N H
    return dense + attention


def _fits_one_call(runner: PrefillRunner, batch: int, length: int) -> bool:
    return batch <= runner.max_prompts and (batch == 1 or batch * length <= runner.token_budget)


def prefill_shapes(b: Bench) -> list[tuple[int, int]]:
    if b.options.prefill_shapes:
        return list(b.options.prefill_shapes)
    longest = b.length_buckets[-1]
    return [(bs, t) for bs, t in PREFILL_SHAPES if t <= longest and _fits_one_call(b.prefill_runner, bs, t)]


def bench_prefill(b: Bench) -> list[Row]:
    if b.prefill_spec is None:
        _progress(f"prefill: skipped (preset {b.preset.name} has no prefill instance)")
        return []
    runner, n_dev = b.prefill_runner, len(b.prefill_spec.devices)
    rng = np.random.default_rng(0)
    rows = []
    for batch, length in prefill_shapes(b):
        if not _fits_one_call(runner, batch, length):
            _progress(
                f"prefill B={batch} T={length}: skipped (a call takes at most {runner.max_prompts} prompts "
                f"of {runner.token_budget} tokens together)"
            )
            continue
        prompts = rng.integers(0, b.cfg.vocab_size, (batch, length)).tolist()
        inputs = runner._inputs(prompts, [SamplingParams()] * batch)
        args = replicated(runner.mesh, *inputs)
        _progress(f"prefill B={batch} T={length}")
        t = measure(lambda args=args: runner._step(runner.params, *args), b.options.repeats)
        flops = prefill_flops(b, batch, length)
        rows.append(
            Row(
                "prefill",
                f"prefill tp={b.prefill_spec.tp}",
                f"B={batch} T={length}",
                t,
                flops / t.seconds / 1e12,
                b.ceilings.matmul_flops * n_dev / 1e12,
                "TFLOP/s",
                devices=n_dev,
                flops=flops,
                tokens=batch * length,
                note=f"packed into a row of {inputs[0].shape[1]}",
            )
        )
    return rows


# ---- decode ----------------------------------------------------------------------------------


def _decode_note(preset, width: int, n_pages: int) -> str:
    if preset.decode_attention == "pallas":
        return f"pallas kernel reads each request's pages in place; pool {n_pages} pages"
    return f"gathers {width} pages of {preset.page_size} per request; pool {n_pages} pages"


def decode_inputs(runner: DecodeRunner, batch: int, context: int) -> tuple:
    """The step's inputs (tokens, positions, page table, counts, sampling) for ``batch``
    requests at position ``context``, each with its own pages for positions up to its call's
    last (distinct, shuffled), padded as the runner pads them and placed on its mesh."""
    per_seq = pages_for(context + runner.steps, runner.page_size)
    pages = np.random.default_rng(batch * 100003 + context).permutation(np.arange(1, runner.n_pages))
    tables = pages[: batch * per_seq].reshape(batch, per_seq).tolist()
    tokens = np.random.default_rng(context).integers(0, runner.cfg.vocab_size, batch).tolist()
    inputs = runner._step_inputs(tokens, [context] * batch, tables, [SamplingParams()] * batch)
    return replicated(runner.mesh, *inputs)


def decode_call(runner: DecodeRunner, args: tuple) -> Callable[[], tuple]:
    """One decode call on ``args`` (``decode_inputs``); each call's pools replace the runner's."""

    def call():
        sampled, runner.k_pages, runner.v_pages = runner._step(runner.params, runner.k_pages, runner.v_pages, *args)
        return sampled, runner.k_pages, runner.v_pages

    return call


def time_decode(runner: DecodeRunner, batch: int, context: int, repeats: int) -> tuple[Timing, tuple[int, int]]:
    """One decode call (``runner.steps`` steps) for ``batch`` requests at position ``context``
    (``decode_inputs``). Returns the timing and the page table's shape [batch bucket, width
    bucket]."""
    args = decode_inputs(runner, batch, context)
    return measure(decode_call(runner, args), repeats), args[2].shape


def why_not(runner: DecodeRunner, batch: int, context: int) -> str:
    """Why ``batch`` requests of ``context`` tokens cannot run on ``runner`` ("" if they can)."""
    per_seq = pages_for(context + runner.steps, runner.page_size)
    if batch > runner.batch_buckets[-1]:
        return f"over the largest batch bucket {runner.batch_buckets[-1]}"
    if batch * per_seq > runner.n_pages - 1:
        return f"needs {batch * per_seq} pages; the pool has {runner.n_pages - 1}"
    return ""


def bench_decode(b: Bench) -> list[Row]:
    spec = b.decode_spec
    runner, n_dev = b.decode_runner(spec, b.options.decode_pages), len(spec.devices)
    batches = sorted(set(b.options.decode_batches or runner.batch_buckets))
    # Room for the call's new tokens.
    contexts = sorted({min(c, b.preset.max_seq_len - runner.steps) for c in b.options.decode_contexts})
    rows = []
    for context in contexts:
        for batch in batches:
            if reason := why_not(runner, batch, context):
                _progress(f"decode B={batch} S={context}: skipped ({reason})")
                continue
            _progress(f"decode B={batch} S={context}")
            try:
                t, (bucket, width) = time_decode(runner, batch, context, b.options.repeats)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                _progress(f"decode B={batch} S={context}: out of device memory; no more decode rows: {e}")
                return rows
            nbytes = b.decode_bytes(batch, context) * runner.steps  # a call of that many steps
            rows.append(
                Row(
                    "decode",
                    f"decode pp={spec.pp} tp={spec.tp} micro={runner.micro}"
                    + (f" steps={runner.steps}" if runner.steps > 1 else ""),
                    f"B={batch} S={context}" + (f" (bucket {bucket})" if bucket != batch else ""),
                    t,
                    nbytes / t.seconds / 1e9,
                    b.ceilings.copy_bytes * n_dev / 1e9,
                    "GB/s",
                    devices=n_dev,
                    bytes=nbytes,
                    tokens=batch * runner.steps,
                    note=_decode_note(b.preset, width, runner.n_pages),
                )
            )
    return rows


# ---- KV transfer -----------------------------------------------------------------------------


def split_note(src: jax.sharding.Sharding, dst: jax.sharding.Sharding, shape: tuple[int, ...]) -> str:
    """Says whether the two layouts cut the array into the same boxes (device identity aside)."""

    def boxes(s):
        indices = s.devices_indices_map(shape).values()
        return sorted({tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True)) for index in indices})

    same = boxes(src) == boxes(dst)
    return f"{'same' if same else 'different'} split: shards {src.shard_shape(shape)} -> {dst.shard_shape(shape)}"


def bench_transfer(b: Bench) -> list[Row]:
    if b.prefill_spec is None or set(b.prefill_spec.devices) == set(b.decode_spec.devices):
        _progress("transfer: skipped (prefill and decode share their devices in this preset)")
        return []
    spec = b.decode_spec
    # Where DecodeRunner asks for a prefix (its prefix_sharding), without allocating its page pool.
    mesh = sharding.make_mesh([b.devices[i] for i in spec.devices], spec.pp, spec.tp)
    prefill, dst = b.prefill_runner, sharding.named_sharding(mesh, axes.PREFIX_AXES, spec.rules)
    src_device, dst_device = b.devices[b.prefill_spec.devices[0]], b.devices[b.decode_spec.devices[0]]
    rng = np.random.default_rng(1)
    rows = []
    for length in b.options.transfer_lengths:
        if length > b.length_buckets[-1]:
            _progress(f"transfer T={length}: skipped (over the preset's max_seq_len {b.preset.max_seq_len})")
            continue
        [prefix] = prefill.run([rng.integers(0, b.cfg.vocab_size, length).tolist()], [SamplingParams()])
        shape, nbytes = prefix.k.shape, prefix.nbytes
        # The same bytes on one device, moved to one device: the reference.
        single = jax.device_put((prefix.k, prefix.v), src_device)
        _progress(f"transfer T={length} ({nbytes / 2**20:.1f} MiB, bucket {shape[1]})")
        t_single = measure(lambda single=single: jax.device_put(single, dst_device), b.options.repeats)
        t_transfer = measure(lambda p=prefix: reshard.transfer(p, dst), b.options.repeats)
        t_naive = measure(lambda p=prefix: jax.device_put((p.k, p.v), dst), b.options.repeats)
        limit = nbytes / t_single.seconds / 1e9
        note = split_note(prefix.k.sharding, dst, shape)
        for name, t in (("reshard.transfer", t_transfer), ("device_put mesh->mesh", t_naive)):
            rows.append(
                Row(
                    "transfer",
                    name,
                    f"T={shape[1]} [L,T,K,H]={list(shape)} x2",
                    t,
                    nbytes / t.seconds / 1e9,
                    limit,
                    "GB/s",
                    devices=len(b.decode_spec.devices),
                    bytes=nbytes,
                    tokens=shape[1],
                    note=f"{note}; limit: device_put {src_device.id}->{dst_device.id} of the same bytes",
                )
            )
    return rows


# ---- pipeline parallelism ----------------------------------------------------------------------


def pp_cases(b: Bench) -> list[tuple[int, int, int, int]]:
    """(pp, tp, steps per call, batch) of the pp benchmark's runs that this host and model allow."""
    cfg, n = b.cfg, len(b.devices)
    batch = -(-(b.options.pp_batch or b.decode_spec.max_batch) // 2) * 2
    steps = b.options.pp_steps or PIPELINE_STEPS
    cases = [(1, 1, 1, batch), (2, 1, 1, batch), (2, 1, steps, batch), (2, 1, steps, 2 * batch)]
    tp_divides = all(x % 2 == 0 for x in (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size))
    if n >= 4 and tp_divides:
        cases += [(2, 2, steps, 2 * batch), (2, 2, steps, 4 * batch)]
    return cases


def bench_pp(b: Bench) -> list[Row]:
    spec, cfg = b.decode_spec, b.cfg
    if cfg.n_layers % 2 or len(b.devices) < 2:
        _progress(f"pp: skipped ({cfg.n_layers} layers on {len(b.devices)} device(s); needs 2 stages)")
        return []
    order = [*spec.devices, *(i for i in range(len(b.devices)) if i not in spec.devices)]
    context = b.options.pp_context
    rows: list[Row] = []
    one_device = 0.0  # pp=1 tokens/s, for the ratios
    for pp, tp, steps, batch in pp_cases(b):
        at = min(context, b.preset.max_seq_len - steps)  # room for the call's new tokens
        n_pages = batch * pages_for(at + steps, b.preset.page_size) + 1
        case = dataclasses.replace(
            spec,
            devices=tuple(order[: pp * tp]),
            pp=pp,
            tp=tp,
            micro_batches=pp,
            max_batch=batch,
            batch_buckets=(batch,),
            steps_per_call=steps,
        )
        _progress(f"pp={pp} tp={tp} steps={steps} on devices {list(case.devices)}: B={batch} S={at}")
        runner = None  # the last case's pool and weights leave the devices first
        try:
            runner = b.decode_runner(case, n_pages)
            t, _ = time_decode(runner, batch, at, b.options.repeats)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            _progress(f"pp={pp} tp={tp} B={batch}: out of device memory; skipped: {e}")
            continue
        per_step = b.decode_bytes(batch, at)
        tok_s = batch * steps / t.seconds
        if pp * tp == 1:
            one_device = tok_s
        versus = f"; {tok_s / one_device:.2f}x pp=1" if one_device else ""
        rows.append(
            Row(
                "pp",
                f"decode pp={pp} tp={tp} micro={pp} steps={steps}",
                f"B={batch} S={at}",
                t,
                tok_s,
                batch * b.ceilings.copy_bytes * pp * tp / per_step,
                "tok/s",
                devices=pp * tp,
                bytes=per_step * steps,
                tokens=batch * steps,
                note=f"{tok_s / (pp * tp):.1f} tok/s per device{versus}; {b.preset.decode_attention}",
            )
        )
    return rows


# ---- running and reporting -----------------------------------------------------------------


def print_table(rows: list[Row], out=sys.stdout) -> None:
    if not rows:
        return
    header = ("bench", "name", "shape", "ms", "blocked ms", "achieved", "limit", "unit", "ratio", "note")
    cells = [
        (
            r.bench,
            r.name,
            r.shape,
            f"{r.time_ms:.3f}",
            f"{r.blocked_ms:.3f}",
            f"{r.achieved:.4g}",
            f"{r.limit:.4g}",
            r.unit,
            f"{r.ratio:.3f}",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)
    print(file=out)


def run(options: Options) -> list[Row]:
    """Runs the selected benchmarks; prints one table per benchmark; returns every row."""
    unknown = set(options.which) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    b = Bench(options)
    backend = jax.default_backend()
    _progress(f"model {b.model.card.name} ({b.cfg.dtype}), mesh {b.preset.name}, {len(b.devices)} {backend} devices")
    b.ceilings, rows = measure_ceilings(b.cfg.dtype, options.repeats)
    print_table(rows)
    benches = {"prefill": bench_prefill, "decode": bench_decode, "transfer": bench_transfer, "pp": bench_pp}
    for name in [n for n in BENCHMARKS if n in options.which and n in benches]:
        these = benches[name](b)
        print_table(these)
        rows += these
    if options.json_out:
        report = {
            "model": b.model.card.name,
            "dtype": b.cfg.dtype,
            "mesh": b.preset.name,
            "unroll_layers": b.preset.unroll_layers,
            "decode_attention": b.preset.decode_attention,
            "backend": jax.default_backend(),
            "device_kind": b.devices[0].device_kind,
            "jax": jax.__version__,
            "repeats": options.repeats,
            "ceilings": dataclasses.asdict(b.ceilings),
            "rows": [r.as_dict() for r in rows],
        }
        with open(options.json_out, "w") as f:
            json.dump(report, f, indent=1)
        _progress(f"wrote {len(rows)} rows to {options.json_out}")
    return rows


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def options_from_flags() -> Options:
    shapes = []
    for s in _PREFILL_SHAPES.value:
        batch, _, length = s.lower().partition("x")
        if not (batch.isdigit() and length.isdigit()):
            raise ValueError(f"--prefill_shapes takes BxT pairs such as 4x512, not {s!r}")
        shapes.append((int(batch), int(length)))
    return Options(
        which=tuple(w.strip() for w in _WHICH.value if w.strip()),
        model=_MODEL.value,
        mesh=_MESH.value,
        prefill_shapes=tuple(shapes),
        decode_batches=_ints(_DECODE_BATCHES.value),
        decode_contexts=_ints(_DECODE_CONTEXTS.value),
        decode_pages=_DECODE_PAGES.value,
        transfer_lengths=_ints(_TRANSFER_LENGTHS.value),
        pp_batch=_PP_BATCH.value,
        pp_context=_PP_CONTEXT.value,
        pp_steps=_PP_STEPS.value,
        repeats=_REPEATS.value,
        json_out=_JSON_OUT.value,
        unroll_layers=None if _UNROLL.value == "preset" else _UNROLL.value == "true",
        decode_attention="" if _DECODE_ATTENTION.value == "preset" else _DECODE_ATTENTION.value,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"jdisagg.bench.micro: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    try:
        options = options_from_flags()
        platform.enable_compilation_cache()
        run(options)
    except (ValueError, FileNotFoundError) as e:
        print(f"jdisagg.bench.micro: error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with exit status 2 (and the reason) for a bad flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"jdisagg.bench.micro: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    platform.simulate_cpu_devices()
    app.run(main, flags_parser=parse_flags)
