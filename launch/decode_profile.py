"""Where a decode step's time goes on one device, at the shapes of ``jdisagg.bench micro``.

For each batch at context S (the micro-benchmark's runner, pool filled with non-zero KV):

1. a ``jax.profiler`` trace of a few back-to-back steps, summed per step by kernel kind
   (cuBLAS GEMMs, the paged-attention kernel, the KV scatter, other fusions, copies, other)
   with counts, and the device's busy time against the step's wall time (the rest: gaps);
2. the paged kernel alone over every layer against the KV bytes it reads, for each kernel
   tuning in ``--configs`` (``PAGES_PER_BLOCK:NUM_WARPS:NUM_STAGES:SPLITS[:SPLIT_WARPS]``), its output
   checked against the first tuning's;
3. the whole step with the first tuning, the tunings whose kernel ran fastest (every
   tuning where part 2 is skipped), and the module's defaults; the step at a context of 16
   tokens (weights, little attention); the step with attention left out (``q * 0`` in place
   of the kernel: weights and KV writes); and the step compiled with other XLA options
   (``--xla_variants``).

Writes ``decode_profile.json`` (every number) and ``decode_profile.md`` (the tables) to
``--out_dir``; the raw traces stay in a temporary directory. ``--kernel_only B`` instead
launches the kernel once per tuning on random KV (no weights), for Nsight Compute.

    PYTHONPATH=. python launch/decode_profile.py --out_dir OUT          # gpu-1, B 8,64,256, S 2047
    JAX_PLATFORMS=cpu PYTHONPATH=. python launch/decode_profile.py --model tiny-llama \\
        --mesh cpu-single --batches 2,4 --context 40 --pages 64 --configs 2:4:3:1,2:4:3:2 --out_dir /tmp/p
    ncu --clock-control none -k regex:paged_decode python launch/decode_profile.py --kernel_only 256 \\
        --configs 4:4:3:1,2:2:3:1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdisagg.bench import micro
from jdisagg.model import paged_kernel
from jdisagg.model.config import shape as model_shape
from jdisagg.runtime.compile import XLA_OPTIONS

# Kernel kinds, first match wins (lower-case kernel name, then its HLO op).
KINDS = (
    ("attention kernel", re.compile(r"paged_decode_attention")),
    ("gemm (cublas)", re.compile(r"gemm|gemv|cublas|nvjet|cutlass|xmma|splitk|sm90_")),
    ("kv write (scatter)", re.compile(r"scatter|dynamic.update.slice")),
    ("copy / memset", re.compile(r"memcpy|memset|^(wrapped_)?copy")),
    ("fusion (elementwise, norms, reductions)", re.compile(r"fusion|^loop_|^input_|^wrapped_|reduce|triton|convert")),
)
# Kernel tunings swept by default: the defaults first, then splits, then each constant moved
# alone and a few together.
CONFIGS = (
    *("default", "2:2:3:2", "2:2:3:4", "2:2:3:8", "2:2:3:16"),
    *("1:2:3:1", "4:2:3:1", "2:1:3:1", "2:4:3:1", "2:2:1:1", "2:2:4:1"),
    *("2:4:3:8", "2:4:3:16", "1:2:3:16"),
)
# Lines of a GPU plane that repeat the kernels (grouped by XLA op or module) rather than hold them.
DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Launch Stats", "Source", "Framework")


def log(message: str) -> None:
    print(f"decode_profile: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Config:
    """A tuning of the paged kernel (its module constants)."""

    pages_per_block: int
    num_warps: int
    num_stages: int
    splits: int  # 0: paged_kernel.splits_for picks
    split_warps: int = 0  # SPLIT_WARPS; 0: num_warps

    @classmethod
    def parse(cls, text: str) -> Config:
        """``PAGES_PER_BLOCK:NUM_WARPS:NUM_STAGES:SPLITS[:SPLIT_WARPS]``, or ``default``: the
        module's constants."""
        if text == "default":
            k = paged_kernel
            return cls(k.PAGES_PER_BLOCK, k.NUM_WARPS, k.NUM_STAGES, k.SPLITS, k.SPLIT_WARPS)
        return cls(*(int(x) for x in text.split(":")))

    @property
    def label(self) -> str:
        warps = self.split_warps or self.num_warps
        split = f":{warps}" if warps != self.num_warps else ""
        return f"{self.pages_per_block}:{self.num_warps}:{self.num_stages}:{self.splits or 'auto'}{split}"

    def apply(self) -> None:
        """Sets the module constants and drops every traced program, so the next calls re-trace."""
        k = paged_kernel
        k.PAGES_PER_BLOCK, k.NUM_WARPS, k.NUM_STAGES, k.SPLITS = (
            self.pages_per_block,
            self.num_warps,
            self.num_stages,
            self.splits,
        )
        k.SPLIT_WARPS = self.split_warps or self.num_warps
        jax.clear_caches()


def kind_of(name: str, hlo_op: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name.lower()) or pattern.search(hlo_op.lower()):
            return kind
    return "other"


def kernel_events(path: str) -> tuple[list[tuple[str, str, int, int]], list[str]]:
    """(name, hlo op, start ns, end ns) of every kernel (or copy) the devices ran, and the line
    names read. GPU planes: their stream lines. Without one (CPU): the host's XLA thunks."""
    pd = jax.profiler.ProfileData.from_file(path)
    events, lines = [], []
    planes = [p for p in pd.planes if p.name.startswith("/device:GPU")]
    for plane in planes:
        for line in plane.lines:
            lines.append(f"{plane.name} {line.name}")
            if any(line.name.startswith(d) for d in DERIVED_LINES):
                continue
            for e in line.events:
                stats = dict((k, v) for k, v in e.stats)
                events.append((e.name, str(stats.get("hlo_op", "")), e.start_ns, e.end_ns))
    if not planes:
        for plane in pd.planes:
            for line in plane.lines:
                for e in line.events:
                    stats = dict((k, v) for k, v in e.stats)
                    if "hlo_op" in stats:
                        events.append((e.name, str(stats["hlo_op"]), e.start_ns, e.end_ns))
                        lines.append(f"{plane.name} {line.name}")
    return events, sorted(set(lines))


def busy_ns(events) -> int:
    """Length of the union of the events' intervals."""
    total, end = 0, None
    for _, _, s, e in sorted(events, key=lambda x: x[2]):
        if end is None or s > end:
            total, end = total + e - s, e
        elif e > end:
            total, end = total + e - end, e
    return total


def summarize(events, steps: int) -> dict:
    """Per step: time and count by kernel kind, busy and wall time, the top kernels."""
    by_kind = collections.defaultdict(lambda: [0, 0])
    by_name = collections.defaultdict(lambda: [0, 0])
    for name, op, s, e in events:
        kind = by_kind[kind_of(name, op)]
        kind[0], kind[1] = kind[0] + e - s, kind[1] + 1
        one = by_name[(name[:100], op[:60])]
        one[0], one[1] = one[0] + e - s, one[1] + 1
    wall = (max(e for *_, e in events) - min(s for *_, s, _ in events)) if events else 0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]
    return {
        "steps": steps,
        "kernels_per_step": len(events) / steps,
        "busy_ms": busy_ns(events) / steps / 1e6,
        "wall_ms": wall / steps / 1e6,
        "kinds": {k: {"ms": v[0] / steps / 1e6, "count": v[1] / steps} for k, v in sorted(by_kind.items())},
        "top": [{"name": n, "hlo_op": op, "ms": v[0] / steps / 1e6, "count": v[1] / steps} for (n, op), v in top],
    }


def profile(runner, batch: int, context: int, steps: int, trace_root: str) -> dict:
    """A trace of ``steps`` back-to-back decode calls (compiled and warmed first), summarized."""
    call = micro.decode_call(runner, micro.decode_inputs(runner, batch, context))
    for _ in range(2):
        jax.block_until_ready(call())
    trace_dir = os.path.join(trace_root, f"B{batch}")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            out = call()
        jax.block_until_ready(out)
    host_ms = (time.perf_counter() - start) / steps * 1e3
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    events, lines = kernel_events(path)
    return {**summarize(events, steps), "traced_host_ms": host_ms, "lines": lines}


def attention_alone(runner, batch: int, context: int, repeats: int):
    """The paged kernel over every layer (one call per layer, as the step makes them) on the
    step's table and lengths: (timing, KV bytes read, output)."""
    cfg = runner.cfg
    _, pos_b, table_bp, _, _ = micro.decode_inputs(runner, batch, context)
    lengths_b = jnp.where(pos_b >= 0, pos_b + 1, 0)
    q_bnh = jax.random.normal(jax.random.key(batch), (pos_b.shape[0], cfg.n_heads, cfg.head_dim), cfg.dtype) * 0.1

    @jax.jit
    def every_layer(q_bnh, k_pages, v_pages, table_bp, lengths_b):
        def one(layer, acc):
            out = paged_kernel.decode_attention(q_bnh, k_pages, v_pages, layer, table_bp, lengths_b)
            return acc + out.astype(jnp.float32)

        return jax.lax.fori_loop(0, cfg.n_layers, one, jnp.zeros(q_bnh.shape, jnp.float32))

    def call():
        return every_layer(q_bnh, runner.k_pages, runner.v_pages, table_bp, lengths_b)

    nbytes = cfg.kv_bytes_per_token(jnp.dtype(cfg.dtype).itemsize) * batch * (context + 1)
    return micro.measure(call, repeats), nbytes, np.asarray(call())


def kernel_only(model: str, batch: int, context: int, configs: list[Config]) -> None:
    """One launch of the paged kernel per tuning over one layer of random bf16 KV in the model's
    shape (no weights): the launches a hardware-counter profiler (Nsight Compute) reads."""
    cfg = model_shape(model or "llama3-8b")
    z = 16
    per_seq = -(-(context + 1) // z)
    n_pages = batch * per_seq + 1
    keys = jax.random.split(jax.random.key(0), 3)
    pool = (1, n_pages, z, cfg.n_kv_heads, cfg.head_dim)
    k_pages = jax.random.normal(keys[0], pool, jnp.bfloat16)
    v_pages = jax.random.normal(keys[1], pool, jnp.bfloat16)
    q_bnh = jax.random.normal(keys[2], (batch, cfg.n_heads, cfg.head_dim), jnp.bfloat16) * 0.1
    table = np.random.default_rng(0).permutation(np.arange(1, n_pages)).reshape(batch, per_seq).astype(np.int32)
    table, lengths = jnp.asarray(table), jnp.full((batch,), context + 1, jnp.int32)
    for c in configs:
        c.apply()
        f = jax.jit(paged_kernel.decode_attention)
        start = time.perf_counter()
        jax.block_until_ready(f(q_bnh, k_pages, v_pages, jnp.int32(0), table, lengths))
        log(f"kernel only B={batch} {c.label}: one launch (with its compile) in {time.perf_counter() - start:.2f} s")


@contextlib.contextmanager
def no_attention():
    """Decode steps traced inside see ``q * 0`` in place of the paged kernel (same shapes; the
    q projection stays live)."""
    real = paged_kernel.decode_attention
    paged_kernel.decode_attention = lambda q_bnh, *args, **kwargs: q_bnh * 0
    jax.clear_caches()
    try:
        yield
    finally:
        paged_kernel.decode_attention = real
        jax.clear_caches()


@contextlib.contextmanager
def xla_options(runner, options: dict):
    """The runner's (jitted, not host-loop) step compiled with ``options`` added to
    ``runtime.compile.XLA_OPTIONS``."""
    jitted = runner._step
    replicated = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())
    runner._step = jax.jit(
        jitted.__wrapped__,
        donate_argnums=(1, 2),
        out_shardings=(replicated, runner.pages_sharding, runner.pages_sharding),
        compiler_options={**XLA_OPTIONS, **options},
    )
    try:
        yield
    finally:
        runner._step = jitted


def markdown(report: dict) -> str:
    return "\n".join(lines(report)) + "\n"


def lines(report: dict) -> list[str]:
    c = report["ceilings"]
    out = [
        f"# Decode step profile: {report['model']} on {report['mesh']} ({report['device_kind']}, jax {report['jax']})",
        "",
        f"Ceilings measured in this run: {c['matmul_tflops']:.0f} TFLOP/s matmul, {c['copy_gbps']:.0f} GB/s copy.",
        f"Context S = {report['context']}; batches {report['batches']}; pool {report['pages']} pages.",
        "",
    ]
    if report["profile"]:
        out += ["## Profile (first tuning), per step", ""]
        out += profile_table(report)
    return out + tables(report)


def profile_table(report: dict) -> list[str]:
    out = []
    kinds = sorted({k for p in report["profile"].values() for k in p["kinds"]})
    out.append("| kind | " + " | ".join(f"B={b} ms (count)" for b in report["profile"]) + " |")
    out.append("| --- |" + " --- |" * len(report["profile"]))
    for kind in kinds:
        cells = []
        for p in report["profile"].values():
            k = p["kinds"].get(kind)
            cells.append(f"{k['ms']:.3f} ({k['count']:.0f})" if k else "-")
        out.append(f"| {kind} | " + " | ".join(cells) + " |")
    for key, what in (("busy_ms", "device busy"), ("wall_ms", "wall, traced"), ("traced_host_ms", "host, traced")):
        out.append(f"| {what} | " + " | ".join(f"{p[key]:.3f}" for p in report["profile"].values()) + " |")
    out.append(
        "| step, untraced (measure) | "
        + " | ".join(f"{report['step'][b][report['configs'][0]]['ms']:.3f}" for b in report["profile"])
        + " |"
    )
    return out


def tables(report: dict) -> list[str]:
    out = ["", "## Paged kernel alone, every layer (ms; GB/s; ratio to copy)", ""]
    out.append("| tuning | " + " | ".join(f"B={b}" for b in report["batches"]) + " |")
    out.append("| --- |" + " --- |" * len(report["batches"]))
    for label in report["configs"]:
        cells = []
        for b in report["batches"]:
            r = report["kernel"].get(str(b), {}).get(label)
            cells.append(
                f"{r['ms']:.3f}; {r['gbps']:.0f}; {r['ratio']:.2f}"
                if r and "ms" in r
                else (r or {}).get("error", "-")[:40]
            )
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "## Whole step (ms; ratio of the micro-benchmark's bytes to copy)", ""]
    labels = sorted({l for b in report["batches"] for l in report["step"][str(b)]}, key=str)
    out.append("| tuning | " + " | ".join(f"B={b}" for b in report["batches"]) + " |")
    out.append("| --- |" + " --- |" * len(report["batches"]))
    for label in labels:
        cells = []
        for b in report["batches"]:
            r = report["step"][str(b)].get(label)
            cells.append(f"{r['ms']:.3f}; {r['ratio']:.3f}" if r and "ms" in r else (r or {}).get("error", "-")[:40])
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["ablation"]:
        out += ["", "## Other steps, first tuning (ms)", ""]
        out.append("| step | " + " | ".join(f"B={b}" for b in report["batches"]) + " |")
        out.append("| --- |" + " --- |" * len(report["batches"]))
        keys = dict.fromkeys(k for b in report["batches"] for k in report["ablation"].get(str(b), {}))
        for key in keys:
            cells = [report["ablation"].get(str(b), {}).get(key, {}) for b in report["batches"]]
            out.append(
                f"| {key} | "
                + " | ".join(f"{r['ms']:.3f}" if "ms" in r else r.get("error", "-")[:40] for r in cells)
                + " |"
            )
    return out


class Session:
    """The runner under test, the tunings, and the report filled part by part (saved after
    every row, so a run cut short keeps what it measured)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out_dir = Path(args.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.batches = [int(b) for b in args.batches.split(",")]
        self.defaults = Config.parse("default")
        self.configs = list(dict.fromkeys(Config.parse(t) for t in args.configs.split(",")))
        self.base = self.configs[0]
        options = micro.Options(model=args.model, mesh=args.mesh, decode_attention="pallas", repeats=args.repeats)
        self.bench = b = micro.Bench(options)
        b.ceilings, _ = micro.measure_ceilings(b.cfg.dtype, args.repeats)
        log(f"ceilings {b.ceilings.matmul_flops / 1e12:.0f} TFLOP/s, {b.ceilings.copy_bytes / 1e9:.0f} GB/s")
        self.runner = b.decode_runner(b.decode_spec, args.pages)
        self.report = {
            "model": b.model.card.name,
            "mesh": b.preset.name,
            "device_kind": b.devices[0].device_kind,
            "jax": jax.__version__,
            "context": args.context,
            "batches": self.batches,
            "pages": self.runner.n_pages,
            "ceilings": {"matmul_tflops": b.ceilings.matmul_flops / 1e12, "copy_gbps": b.ceilings.copy_bytes / 1e9},
            "defaults": self.defaults.label,
            "min_programs": paged_kernel.MIN_PROGRAMS,
            "configs": [c.label for c in self.configs],
            "profile": {},
            "kernel": {},
            "step": {str(batch): {} for batch in self.batches},
            "ablation": {},
        }

    def save(self) -> None:
        (self.out_dir / "decode_profile.json").write_text(json.dumps(self.report, indent=1))
        (self.out_dir / "decode_profile.md").write_text(markdown(self.report))

    def step(self, batch: int, config: Config, context: int | None = None, key: str | None = None) -> None:
        """The whole step with ``config``: a row of ``step`` (or, under ``key``, of ``ablation``)."""
        b, context = self.bench, context or self.args.context
        config.apply()
        try:
            t, (bucket, _) = micro.time_decode(self.runner, batch, context, self.args.repeats)
        except Exception as e:  # a tuning the compiler refuses (shared memory): recorded, not fatal
            log(f"step B={batch} {config.label}: {e!r:.300}")
            row = {"error": repr(e)[:300]}
        else:
            nbytes = b.decode_bytes(batch, context)
            programs = bucket * b.cfg.n_kv_heads
            row = {
                "ms": t.seconds * 1e3,
                "blocked_ms": t.blocked * 1e3,
                "bucket": bucket,
                "bytes": nbytes,
                "ratio": nbytes / t.seconds / b.ceilings.copy_bytes,
                "splits": paged_kernel.splits_for(programs, self.runner.max_pages_per_seq, config.pages_per_block),
            }
            log(f"step B={batch} S={context} {config.label}: {row['ms']:.3f} ms, ratio {row['ratio']:.3f}")
        self.report["step" if key is None else "ablation"].setdefault(str(batch), {})[key or config.label] = row
        self.save()

    def profile(self) -> None:
        """Part 1, with the first tuning."""
        with tempfile.TemporaryDirectory() as traces:
            for batch in self.batches:
                self.step(batch, self.base)
                self.base.apply()
                p = profile(self.runner, batch, self.args.context, self.args.profile_steps, traces)
                self.report["profile"][str(batch)] = p
                log(f"profile B={batch}: busy {p['busy_ms']:.3f} ms, wall {p['wall_ms']:.3f} ms per step")
                self.save()

    def kernel(self) -> None:
        """Part 2: every tuning, its output against the first tuning's."""
        for batch in self.batches:
            first = None
            for config in self.configs:
                config.apply()
                try:
                    t, nbytes, out = attention_alone(self.runner, batch, self.args.context, self.args.repeats)
                except Exception as e:
                    log(f"kernel B={batch} {config.label}: {e!r:.300}")
                    row = {"error": repr(e)[:300]}
                else:
                    first = out if first is None else first
                    diff = float(np.max(np.abs(out - first)) / max(float(np.max(np.abs(first))), 1e-30))
                    row = {
                        "ms": t.seconds * 1e3,
                        "bytes": nbytes,
                        "gbps": nbytes / t.seconds / 1e9,
                        "ratio": nbytes / t.seconds / self.bench.ceilings.copy_bytes,
                        "rel_diff_to_first": diff,
                    }
                    log(f"kernel B={batch} {config.label}: {row['ms']:.3f} ms, {row['gbps']:.0f} GB/s, diff {diff:.1e}")
                self.report["kernel"].setdefault(str(batch), {})[config.label] = row
                self.save()

    def step_all(self) -> None:
        """Part 3's whole steps: the first tuning, the fastest kernels' (all without part 2), the defaults."""
        for batch in self.batches:
            kernel = self.report["kernel"].get(str(batch), {})
            timed = sorted(
                (kernel[c.label]["ms"], i) for i, c in enumerate(self.configs) if "ms" in kernel.get(c.label, {})
            )
            best = [self.configs[i] for _, i in timed[: self.args.whole_step]] if timed else self.configs
            for config in dict.fromkeys([self.base, *best, self.defaults]):
                if config.label not in self.report["step"][str(batch)]:
                    self.step(batch, config)

    def ablation(self) -> None:
        """Part 3's other steps, with the first tuning."""
        for batch in self.batches:
            self.step(batch, self.base, context=16, key="S=16")
            with no_attention():
                self.step(batch, self.base, key="no attention")

    def xla_variants(self, variants: dict) -> None:
        for name, options in variants.items():
            for batch in self.batches:
                try:
                    with xla_options(self.runner, options):
                        self.step(batch, self.base, key=f"xla {name}")
                except Exception as e:  # no jitted step to rebuild (the host loop)
                    log(f"xla {name} B={batch}: {e!r:.300}")
                    self.report["ablation"].setdefault(str(batch), {})[f"xla {name}"] = {"error": repr(e)[:300]}
        self.base.apply()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--mesh", default="gpu-1")
    parser.add_argument("--batches", default="8,64,256")
    parser.add_argument("--context", type=int, default=2047)
    parser.add_argument("--pages", type=int, default=40000, help="KV pages of the pool (B=256 at S=2047 needs 32768)")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="kernel tunings (Config.parse), the first the baseline; default: the module's",
    )
    parser.add_argument("--profile_steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--whole_step", type=int, default=2, help="per batch, the step with this many fastest tunings")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: profile,kernel,step,ablation")
    parser.add_argument(
        "--xla_variants",
        default="{}",
        help="JSON {name: {option: value}}: the step (first tuning) again with these XLA options added",
    )
    parser.add_argument(
        "--kernel_only", type=int, default=0, help="only one kernel launch per tuning at this batch (for ncu)"
    )
    parser.add_argument("--out_dir", default="")
    args = parser.parse_args()
    if args.kernel_only:
        kernel_only(args.model, args.kernel_only, args.context, [Config.parse(t) for t in args.configs.split(",")])
        return
    if not args.out_dir:
        parser.error("--out_dir is required")
    session = Session(args)
    skip = set(filter(None, args.skip.split(",")))
    parts = {
        "profile": session.profile,
        "kernel": session.kernel,
        "step": session.step_all,
        "ablation": session.ablation,
    }
    for name, run in parts.items():
        if name not in skip:
            run()
    session.xla_variants(json.loads(args.xla_variants))
    session.save()
    print(markdown(session.report))


if __name__ == "__main__":
    main()
