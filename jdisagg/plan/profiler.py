"""Profiling: time the real compiled prefill and decode programs on this machine over a grid,
for every (tp, pp) layout the host can form, and fit the latency models (``plan.latency``).

Each call is timed the way its worker makes it (``runtime.workers``): ``PrefillRunner.run``
(the packed call, the prefix cuts, the first tokens back on the host), ``DecodeRunner.step``
and ``mixed`` (inputs built on the host, one step, the tokens back; a pp > 1 layout's call
runs PIPELINE_STEPS steps, as its presets' do, and is recorded per step), and a prefix's pull
and insert into the pool. The grid:

* prefill (pp = 1 layouts): single prompts at and between the length buckets, packs of k
  equal prompts, and FCFS batches of chat-like lengths, up to a token budget of twice the
  longest prompt (so the curve past L_m shows);
* decode: batches from 1 to ``max_batch`` rows at contexts from 100 to ``max_seq_len``;
  chunked mixed steps at a few batches, contexts and chunk positions;
* insert: one prefix of each length bucket into the pool; transfer (two devices or more): the
  same prefixes from a prefill device to a decode device;
* host: the scheduler's own time per decode step and per row (``Scheduler`` verbs on fake
  requests).

Pools larger than memory allows reuse pages across rows (the timing reads the same bytes).
Each point is the median of ``repeats`` calls waited for one by one, after one that compiles.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from jdisagg import cards
from jdisagg.bench import workloads
from jdisagg.bench.micro import fill_pages
from jdisagg.model import axes, sharding
from jdisagg.plan import latency
from jdisagg.plan.profile import DEFAULT_TRANSFER, Config, Profile, Serving
from jdisagg.plan.system import batch_buckets, decode_read, preset_length_buckets
from jdisagg.preset import PIPELINE_STEPS, InstanceSpec, MeshPreset, load_preset
from jdisagg.runtime.buckets import bucket_for
from jdisagg.runtime.instances import decode_runner, prefill_runner
from jdisagg.runtime.memory import free_device_bytes, pages_that_fit
from jdisagg.sched.pages import pages_for
from jdisagg.sched.params import SamplingParams
from jdisagg.transfer.reshard import InProcess

DECODE_BATCHES = (1, 8, 16, 32, 64, 100, 128, 192, 256)
DECODE_CONTEXTS = (16, 100, 500, 1000, 2000)
CPU_MEMORY = 2 * 2**30  # memory per device recorded for CPU profiles (no device statistics there)


@dataclasses.dataclass(frozen=True)
class Options:
    model: str
    mesh: str = ""  # the serving knobs to profile; "": gpu-1 on GPUs, cpu-single on CPU
    layouts: tuple[tuple[int, int], ...] = ()  # (): every (tp, pp) the host can form
    repeats: int = 3
    quick: bool = False  # a small grid (tests, smoke runs)
    memory_per_device: int = 0  # 0: what JAX may allocate on one device (CPU: CPU_MEMORY)
    progress: bool = True


def host_layouts(cfg, n_devices: int) -> list[tuple[int, int]]:
    """Every (tp, pp) whose mesh fits the host and divides the model (default axis rules)."""
    out = []
    for tp in range(1, n_devices + 1):
        for pp in range(1, n_devices // tp + 1):
            try:
                axes.check_divisible(cfg, {"tp": tp, "pp": pp}, axes.DEFAULT_RULES, "layout")
            except ValueError:
                continue
            if pp == 1 or cfg.n_layers % pp == 0:
                out.append((tp, pp))
    return out


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _serving(preset: MeshPreset) -> Serving:
    pre = next((i for i in preset.instances if i.runs_prefill), None)
    dec = next((i for i in preset.instances if i.runs_decode), None)
    chunked = next((i for i in preset.instances if i.role == "chunked"), None)
    return Serving(
        page_size=preset.page_size,
        max_seq_len=preset.max_seq_len,
        length_buckets=preset_length_buckets(preset),
        decode_attention=preset.decode_attention,
        unroll_layers=preset.unroll_layers,
        prefill_max_batch=pre.max_batch if pre and pre.role == "prefill" else 16,
        decode_max_batch=dec.max_batch if dec else 64,
        batch_buckets=dec.batch_buckets if dec else (),
        chunk_tokens=chunked.chunk_tokens if chunked else 512,
    )


def _weight_bytes(params, device) -> int:
    return sum(
        s.data.nbytes
        for leaf in jax.tree_util.tree_leaves(params)
        for s in leaf.addressable_shards
        if s.device == device
    )


# ---- grids ---------------------------------------------------------------------------------------


def prefill_grid(buckets: tuple[int, ...], budget: int, max_prompts: int, quick: bool) -> list[list[int]]:
    """Prompt sets of one call each: singles, packs of equal prompts, chat-like FCFS batches."""
    longest = buckets[-1]
    singles = sorted({*buckets, *(int(b * 0.8) for b in buckets if b > 64 and not quick)})
    grid = [[n] for n in singles]
    for n in buckets[: 1 if quick else 4]:
        for k in (2, 4) if quick else (2, 4, 8, 16):
            if k <= max_prompts and k * n <= budget:
                grid.append([n] * k)
    if budget > longest:
        grid.append([longest] * (budget // longest))
    rng = np.random.default_rng(0)
    for _ in range(1 if quick else 6):
        batch, total = [], 0
        for i, _o in workloads.sample_chat(64, rng):
            i = min(i, longest)
            if batch and (len(batch) == max_prompts or total + i > budget):
                break
            batch.append(i)
            total += i
        grid.append(batch)
    return grid


def decode_grid(max_batch: int, max_seq_len: int, quick: bool) -> list[tuple[int, int]]:
    batches = [b for b in DECODE_BATCHES if b <= max_batch] or [max_batch]
    if max_batch not in batches:
        batches.append(max_batch)
    contexts = sorted({min(c, max_seq_len - 2) for c in DECODE_CONTEXTS})
    if quick:
        batches = sorted({batches[0], batches[len(batches) // 2], batches[-1]})
        contexts = sorted({contexts[0], contexts[-1]})
    return [(b, s) for s in contexts for b in batches]


# ---- the profiler ---------------------------------------------------------------------------------


class Profiler:
    def __init__(self, options: Options):
        self.o = options
        self.devices = jax.devices()
        self.platform = self.devices[0].platform
        self.model = cards.open_model(cards.load_card(options.model))
        self.cfg = self.model.cfg
        mesh = options.mesh or ("cpu-single" if self.platform == "cpu" else "gpu-1")
        self.preset = load_preset(mesh)
        self.serving = _serving(self.preset)
        self.buckets = self.serving.length_buckets
        self.budget = 2 * self.buckets[-1]
        stats = self.devices[0].memory_stats() or {}
        self.memory = options.memory_per_device or stats.get("bytes_limit") or CPU_MEMORY
        self.layouts = list(options.layouts) or host_layouts(self.cfg, len(self.devices))
        self.sp = SamplingParams()
        self.bar: tqdm | None = None

    def time(self, call: Callable[[], object]) -> float:
        t = blocked(call, self.o.repeats)
        if self.bar is not None:
            self.bar.update()
        return t

    def _spec(self, role: str, tp: int, pp: int, **kw) -> InstanceSpec:
        return dataclasses.replace(InstanceSpec(role=role, index=0, devices=tuple(range(tp * pp)), pp=pp, tp=tp), **kw)

    def run(self) -> Profile:
        cfg, s = self.cfg, self.serving
        grids = {}
        for tp, pp in self.layouts:
            n = len(decode_grid(s.decode_max_batch, s.max_seq_len, self.o.quick)) + 12 + len(self.buckets)
            if pp == 1:
                n += len(prefill_grid(self.buckets, self.budget, 16, self.o.quick))
            grids[(tp, pp)] = n
        self.bar = tqdm(total=sum(grids.values()), desc="profiling", disable=not self.o.progress, unit="point")
        configs, transfer, measured = [], DEFAULT_TRANSFER, False
        with self.bar:
            for tp, pp in self.layouts:
                self.bar.set_postfix_str(f"tp={tp} pp={pp}")
                configs.append(self.layout(tp, pp))
            if len(self.devices) >= 2:
                transfer, measured = self.transfer(), True
        step_s, row_s = host_costs()
        return Profile(
            model=self.model.card.name,
            cfg=cfg,
            platform=self.platform,
            device_kind=self.devices[0].device_kind,
            devices=len(self.devices),
            memory_per_device=int(self.memory),
            serving=s,
            configs=tuple(configs),
            transfer=transfer,
            transfer_measured=measured,
            host_step_s=step_s,
            host_row_s=row_s,
            commit=_commit(),
            jax=jax.__version__,
            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def layout(self, tp: int, pp: int) -> Config:
        """Places the weights on a (tp, pp) mesh and times its programs."""
        s = self.serving
        devices = self.devices[: tp * pp]
        mesh = sharding.make_mesh(devices, pp, tp)
        rules = axes.DEFAULT_RULES
        params = self.model.place(sharding.param_shardings(_abstract(self.cfg), mesh, rules))
        weights = _weight_bytes(params, devices[0])
        points: dict[str, list] = {}
        fits: dict[str, latency.Fit] = {}
        scratch: dict[int, int] = {}
        L_m = self.budget
        if pp == 1:
            spec = self._spec("prefill", tp, 1, max_batch=16, token_budget=self.budget)
            runner = prefill_runner(self.cfg, params, mesh, spec, self.preset, self.buckets)
            points["prefill"] = self.prefill_points(runner)
            fits["prefill"] = latency.fit("prefill", points["prefill"])
            L_m = l_m(fits["prefill"], runner.token_buckets, self.buckets)
            # Scratch of the largest row and of the row the base preset's budget ends at (what
            # colocated instances keep beside their pool): the compiles hit the persistent cache.
            base = next((i.token_budget for i in self.preset.instances if i.runs_prefill), 2048)
            wanted = {runner.token_buckets[-1], bucket_for(min(base, self.budget), runner.token_buckets)}
            for p in runner.programs():
                found = re.search(r"N=(\d+)", p.label)  # none: a program every bucket runs (the host loop's head)
                for n in wanted if found is None else {int(found.group(1))} & wanted:
                    scratch[n] = max(scratch.get(n, 0), p.compiled().memory_analysis().temp_size_in_bytes)
            del runner
        attention = s.decode_attention if tp * pp == 1 and self.platform == "gpu" else "dot"
        preset = dataclasses.replace(self.preset, decode_attention=attention)
        spec = self._spec(
            "chunked" if pp == 1 else "decode",
            tp,
            pp,
            max_batch=-(-s.decode_max_batch // pp) * pp,
            micro_batches=pp,
            steps_per_call=PIPELINE_STEPS if pp > 1 else 1,  # as a preset's pp > 1 decode instance
            chunk_tokens=s.chunk_tokens if pp == 1 else 0,
            batch_buckets=tuple(b for b in s.batch_buckets if b % pp == 0),
        )
        spec = dataclasses.replace(spec, batch_buckets=batch_buckets(spec))
        n_pages = self.pool(mesh, spec, preset)
        runner = decode_runner(self.cfg, params, mesh, spec, preset, n_pages)
        fill_pages(runner)
        points["decode"] = self.decode_points(runner, preset)
        fits["decode"] = latency.fit("decode", points["decode"])
        if pp == 1:
            points["mixed"] = self.mixed_points(runner, preset)
            fits["mixed"] = latency.fit("mixed", points["mixed"])
        points["insert"] = self.insert_points(runner)
        fits["insert"] = latency.fit("insert", points["insert"])
        del runner, params
        logging.info("tp=%d pp=%d: L_m %d, fits %s", tp, pp, L_m, {k: f.form for k, f in fits.items()})
        return Config(tp, pp, weights, L_m, attention, prefill_scratch=scratch, points=points, **fits)

    def pool(self, mesh, spec: InstanceSpec, preset: MeshPreset) -> int:
        """Pages for the largest grid batch at the longest context, or what fits."""
        want = spec.max_batch * pages_for(self.serving.max_seq_len, self.serving.page_size) + 1
        free = free_device_bytes(mesh)
        if free is None:
            free = self.memory - self.cfg.param_count() * jnp.dtype(self.cfg.dtype).itemsize // mesh.size
        fit = pages_that_fit(free, self.cfg, spec, preset)
        return int(min(want, fit))

    # ---- programs ------------------------------------------------------------------------

    def prefill_points(self, runner) -> list:
        out = []
        for prompts in prefill_grid(self.buckets, runner.token_budget, runner.max_prompts, self.o.quick):
            ids = [[3] * n for n in prompts]
            params = [self.sp] * len(ids)
            seconds = self.time(lambda ids=ids, params=params: runner.run(ids, params))
            row = bucket_for(sum(prompts), runner.token_buckets)
            out.append((latency.prefill_features(prompts, row), seconds))
        return out

    def _tables(self, runner, batch: int, context: int) -> list[list[int]]:
        per = pages_for(context + runner.steps, runner.page_size)  # every step of a call has its page
        ids = np.arange(batch * per) % (runner.n_pages - 1) + 1
        return ids.reshape(batch, per).tolist()

    def decode_points(self, runner, preset: MeshPreset) -> list:
        out = []
        for b, ctx in decode_grid(runner.batch_buckets[-1], self.serving.max_seq_len, self.o.quick):
            tables = self._tables(runner, b, ctx)
            args = ([5] * b, [ctx] * b, tables, [self.sp] * b)
            seconds = self.time(lambda args=args: runner.step(*args)) / runner.steps  # per step of the call
            bb = bucket_for(b, runner.batch_buckets)
            width = bucket_for(len(tables[0]), runner.width_buckets)
            read = decode_read(preset, runner.host_loop, bb, width, ctx + 1, b * (ctx + 1))
            out.append((latency.decode_features(b, bb, b * (ctx + 1), read), seconds))
        return out

    def mixed_points(self, runner, preset: MeshPreset) -> list:
        out = []
        c = runner.chunk_tokens
        batches = [b for b in (1, 16, 64, runner.batch_buckets[-1]) if b <= runner.batch_buckets[-1]]
        top = self.serving.max_seq_len - 2
        starts = sorted({0, max(0, min(1024, top - c))})
        contexts = sorted({min(100, top), min(1500, top)})
        for b in batches[:: 2 if self.o.quick else 1]:
            for ctx in contexts:
                for start in starts:
                    tables = self._tables(runner, b, ctx)
                    chunk_pages = self._tables(runner, 1, start + c)[0]
                    args = ([5] * b, [ctx] * b, tables, [self.sp] * b, [3] * c, start, chunk_pages, self.sp)
                    seconds = self.time(lambda args=args: runner.mixed(*args))
                    bb = bucket_for(b, runner.batch_buckets)
                    width = bucket_for(max(len(tables[0]), len(chunk_pages)), runner.width_buckets)
                    read = decode_read(preset, False, bb, width, ctx + 1, b * (ctx + 1))  # the mixed step gathers
                    out.append((latency.decode_features(b, bb, b * (ctx + 1), read, start + c), seconds))
        return out

    def insert_points(self, runner) -> list:
        """A prefix of each length bucket pulled into the pool from its own devices, then inserted."""
        out, transfer = [], InProcess()
        for t in self.buckets:
            shape = (self.cfg.n_layers, t, self.cfg.n_kv_heads, self.cfg.head_dim)
            kv = jax.device_put(np.full(shape, 0.5, jnp.dtype(self.cfg.dtype)), runner.prefix_sharding)
            prefix = _FakePrefix(kv, kv)
            pages = list(range(1, t // runner.page_size + 1))

            def call(prefix=prefix, pages=pages):
                [(k, v)] = transfer.pull([prefix], runner.prefix_sharding)
                runner.insert(k, v, pages)
                return runner.k_pages

            out.append(({"one": 1.0, "tokens": float(t)}, self.time(call)))
        return out

    def transfer(self) -> latency.Fit:
        """Prefixes of each length bucket from a prefill device to a decode device."""
        src = sharding.make_mesh(self.devices[:1], 1, 1)
        dst = sharding.named_sharding(sharding.make_mesh(self.devices[1:2], 1, 1), axes.PREFIX_AXES, axes.DEFAULT_RULES)
        prefix_sharding = sharding.named_sharding(src, axes.PREFIX_AXES, axes.DEFAULT_RULES)
        points, transfer = [], InProcess()
        for t in self.buckets:
            shape = (self.cfg.n_layers, t, self.cfg.n_kv_heads, self.cfg.head_dim)
            kv = jax.device_put(np.full(shape, 0.5, jnp.dtype(self.cfg.dtype)), prefix_sharding)
            prefix = _FakePrefix(kv, kv)
            seconds = blocked(lambda p=prefix: transfer.pull([p], dst), self.o.repeats)
            points.append(({"one": 1.0, "bytes": float(prefix.nbytes)}, seconds))
        return latency.fit("transfer", points)


def blocked(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``call`` waited for one by one, after ``warmup`` calls (the first
    compiles): a worker waits for each call it makes."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@dataclasses.dataclass
class _FakePrefix:
    """A prefix's KV without a prefill call (what ``InProcess.pull`` reads)."""

    k: jax.Array
    v: jax.Array

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _abstract(cfg):
    from jdisagg.model import decoder

    return decoder.abstract_params(cfg)


def l_m(fit: latency.Fit, row_buckets: tuple[int, ...], buckets: tuple[int, ...], within: float = 1.1) -> int:
    """L_m: the smallest token bucket whose time per prompt token is within ``within`` of the
    best over the buckets (a bucket past the longest prompt holds prompts of the longest
    length); past it, a bigger call no longer buys throughput."""
    per_token = {}
    for n in row_buckets:
        lengths = (
            [n] if n <= buckets[-1] else [buckets[-1]] * (n // buckets[-1]) + [n % buckets[-1]] * bool(n % buckets[-1])
        )
        per_token[n] = fit(latency.prefill_features(lengths, n)) / n
    best = min(per_token.values())
    return min(n for n, p in per_token.items() if p <= within * best)


def host_costs(repeats: int = 20) -> tuple[float, float]:
    """The scheduler's own seconds per decode step and per row (take_step + sampled on fake
    requests), from steps of 16 and 256 rows."""
    from jdisagg.sched.request import Request
    from jdisagg.sched.scheduler import DecodeSpec, PrefillSpec, Scheduler

    class P:
        first_token, first_logprob, held_tokens, nbytes, length = 5, None, 16, 0, 16

    out = {}
    for rows in (16, 256):
        s = Scheduler(
            [PrefillSpec(rows, 16 * rows, 1 << 30)],
            [DecodeSpec(rows * 200 + 2, 16, rows)],
            max_seq_len=1 << 20,
            eos_ids=(),
        )
        for _ in range(rows):
            s.submit(Request([3] * 16, SamplingParams(max_tokens=1 << 20, ignore_eos=True)))
        batch = s.take_prefill(0)
        s.prefilled(0, batch, [P() for _ in batch.requests])
        s.pulled(0, s.take_pulls(0), 0.0)
        tokens, logprobs = [[5]] * rows, [[None]] * rows
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            b = s.take_step(0)
            s.sampled(0, b, tokens, logprobs)
            times.append(time.perf_counter() - start)
        out[rows] = float(np.median(times))
    row = max(0.0, (out[256] - out[16]) / 240)
    return max(0.0, out[16] - 16 * row), row


def run(options: Options) -> Profile:
    return Profiler(options).run()
