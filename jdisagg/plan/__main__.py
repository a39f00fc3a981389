"""``python -m jdisagg.plan``: profile the programs, simulate presets, search placements.

    python -m jdisagg.plan profile --model llama3-8b --mesh gpu-1 --out profiles/llama3-8b.h200.json
    python -m jdisagg.plan calibrate --profile P.json --result bench.json.gz --mesh gpu-1   # host cost
    python -m jdisagg.plan simulate --profile P.json --mesh gpu-2,gpu-2-colocated --workload chat \\
        --slo_ttft 0.25 --slo_tpot 0.1 [--rates 20,28,36]
    python -m jdisagg.plan search --profile P.json --workload chat --slo_ttft 0.25 --slo_tpot 0.1 \\
        --gpus 8 --gpus_per_node 8 --out plan.toml
    python -m jdisagg.plan search --profile P.json --trace served.jsonl --mesh gpu-2 ...   # replan

Bad input prints one line to stderr and exits with status 2 (README, "Planner").
"""

from __future__ import annotations

import argparse
import json
import sys

from jdisagg import platform

PROG = "jdisagg.plan"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description="Placement planner (README, 'Planner').")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prof = sub.add_parser("profile", help="time the compiled programs here and fit the latency models")
    prof.add_argument("--model", required=True, help="model card (e.g. llama3-8b, opt-13b)")
    prof.add_argument("--mesh", default="", help="preset whose serving knobs to profile (default gpu-1 / cpu-single)")
    prof.add_argument("--layouts", default="", help="(tp)x(pp) layouts, e.g. 1x1,2x1 (default: all the host forms)")
    prof.add_argument("--out", default="", help="profile JSON (default profiles/MODEL.DEVICE.json)")
    prof.add_argument("--repeats", type=int, default=3, help="timed calls per point (median)")
    prof.add_argument("--memory_gib", type=float, default=0, help="memory per device to record (default: JAX's)")
    prof.add_argument("--quick", action="store_true", help="a small grid")
    prof.add_argument("--noprogress", action="store_true")

    for name, helptext in (("simulate", "simulate presets on a profile"), ("search", "search the best placement")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--profile", required=True, help="profile JSON (python -m jdisagg.plan profile)")
        c.add_argument("--workload", default="chat", help="code, chat, summarize, fixed or trace")
        c.add_argument("--trace", default="", help="a JSONL trace (jdisagg.bench format); implies --workload trace")
        c.add_argument("--slo_ttft", type=float, default=0.25)
        c.add_argument("--slo_tpot", type=float, default=0.1)
        c.add_argument("--attainment", type=float, default=0.9, help="target SLO attainment")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--cv", type=float, default=1.0, help="arrival gaps' coefficient of variation (1: Poisson)")
        c.add_argument("--warmup_s", type=float, default=6.0, help="arrivals before the counted ones, per point")
        c.add_argument("--duration_s", type=float, default=12.0, help="counted arrivals per point")
        c.add_argument("--input_len", type=int, default=512, help="fixed: prompt tokens")
        c.add_argument("--output_len", type=int, default=64, help="fixed: output tokens")
        c.add_argument("--humaneval_path", default="", help="code: HumanEval file or lengths JSON")
        c.add_argument("--gpus_per_node", type=int, default=8)
        c.add_argument("--cross_node_gbps", type=float, default=25.0, help="bandwidth between nodes (Gbit/s)")
        c.add_argument("--json_out", default="", help="write the result as JSON here")
    cal = sub.add_parser("calibrate", help="set the server's host cost per streamed token from a bench result")
    cal.add_argument("--profile", required=True)
    cal.add_argument("--result", required=True, help="a jdisagg.bench run result (.json or .json.gz)")
    cal.add_argument("--mesh", required=True, help="the preset that result measured")
    cal.add_argument("--humaneval_path", default="", help="code: HumanEval file or lengths JSON")
    cal.add_argument("--out", default="", help="the calibrated profile (default: overwrite --profile)")
    sim = sub.choices["simulate"]
    sim.add_argument("--mesh", required=True, help="preset(s) to simulate, comma-separated")
    sim.add_argument("--rates", default="", help="request rates to simulate (default: find the goodput)")
    srch = sub.choices["search"]
    srch.add_argument("--gpus", type=int, default=0, help="GPUs to plan for (default: the trace's preset, or 1)")
    srch.add_argument("--rate", type=float, default=0.0, help="request rate to carry with the fewest GPUs")
    srch.add_argument("--mesh", default="", help="the preset serving now: does it still meet the target?")
    srch.add_argument("--out", default="", help="write the planned preset (TOML) here")
    srch.add_argument("--jobs", type=int, default=0, help="simulation processes (default: CPUs, at most 4)")
    srch.add_argument("--top", type=int, default=2, help="disaggregated units to verify by whole simulation")
    return p


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}".splitlines()[0], file=sys.stderr)
    sys.exit(2)


def _layouts(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in filter(None, text.split(",")):
        tp, _, pp = part.strip().lower().partition("x")
        if not (tp.isdigit() and pp.isdigit() and int(tp) > 0 and int(pp) > 0):
            raise ValueError(f"--layouts takes TPxPP pairs such as 1x1,2x1, not {part!r}")
        out.append((int(tp), int(pp)))
    return tuple(out)


def _workload(a):
    from jdisagg.bench import workloads
    from jdisagg.bench.stats import Slo
    from jdisagg.plan.simulate import Workload

    name = "trace" if a.trace else a.workload
    if name not in workloads.WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(workloads.WORKLOADS)}")
    if name == "trace" and not a.trace:
        raise ValueError("--workload trace needs --trace FILE")
    if a.slo_ttft <= 0 or a.slo_tpot <= 0 or not 0 < a.attainment <= 1:
        raise ValueError("--slo_ttft and --slo_tpot must be > 0 and --attainment in (0, 1]")
    if a.cv <= 0 or a.duration_s <= 0 or a.warmup_s < 0:
        raise ValueError("--cv and --duration_s must be > 0, --warmup_s >= 0")
    trace = tuple(workloads.read_trace(a.trace)) if a.trace else ()
    if trace and any(e.prompt is not None for e in trace):
        raise ValueError(f"{a.trace}: the planner reads lengths; give input_len, not prompt text")
    w = Workload(
        name,
        Slo(a.slo_ttft, a.slo_tpot),
        a.attainment,
        a.cv,
        a.seed,
        a.warmup_s if not trace else 0.0,
        a.duration_s,
        a.input_len,
        a.output_len,
        a.humaneval_path or None,
        trace,
    )
    w.lengths(4)  # a missing HumanEval file fails here, in one line
    if trace and w.trace_rate() <= 0:
        raise ValueError(f"{a.trace}: a trace needs two or more timestamps to have a rate")
    return w


def profile(a) -> None:
    from jdisagg.plan import profiler

    platform.enable_compilation_cache()
    options = profiler.Options(
        a.model, a.mesh, _layouts(a.layouts), a.repeats, a.quick, int(a.memory_gib * 2**30), not a.noprogress
    )
    p = profiler.run(options)
    out = a.out or f"profiles/{p.model}.{p.device_kind.replace(' ', '-').lower() or p.platform}.json"
    p = p.__class__(**{**p.__dict__, "source": out})
    p.save(out)
    print(f"{'layout':>8} {'kind':>8} {'form':>9} {'held-out err (mean/max)':>24}  other form   L_m")
    for c in p.configs:
        for kind in ("prefill", "decode", "mixed", "insert"):
            f = getattr(c, kind)
            if f is None:
                continue
            e = f.errors.get(f.form, {})
            other = ", ".join(f"{k} {v['mean']:.1%}" for k, v in f.errors.items() if k != f.form)
            print(
                f"{f'{c.tp}x{c.pp}':>8} {kind:>8} {f.form:>9} {e.get('mean', 0):>11.1%} / {e.get('max', 0):>6.1%}"
                f"      {other or '-':<12} {c.L_m if kind == 'prefill' else ''}"
            )
    print(f"{PROG}: wrote {out} ({p.device_kind}, {p.memory_per_device / 2**30:.1f} GiB per device)")


def _result(system, w, outcomes, goodput) -> dict:
    """A result in ``jdisagg.bench run``'s format, so ``stats.format_table`` prints it."""
    import dataclasses

    gpus = system.gpus
    return {
        "label": system.preset.name,
        "workload": w.name,
        "slo": dataclasses.asdict(w.slo),
        "target_attainment": w.target,
        "gpus": gpus,
        "goodput": goodput.record(gpus),
        "points": [o.summary(gpus) for o in outcomes],
        "simulated": True,
    }


def simulate(a) -> None:
    from jdisagg.bench import stats
    from jdisagg.plan import profile as prof
    from jdisagg.plan import search, simulate, system
    from jdisagg.preset import load_preset

    p, w = prof.load(a.profile), _workload(a)
    rates = [float(r) for r in a.rates.split(",") if r.strip()] if a.rates else []
    if any(r <= 0 for r in rates):
        raise ValueError("--rates must all be > 0")
    results = []
    for name in filter(None, (m.strip() for m in a.mesh.split(","))):
        s = system.build(load_preset(name), p, gpus_per_node=a.gpus_per_node, cross_node_gbps=a.cross_node_gbps)
        if rates:
            outcomes = simulate.sweep(s, w, rates)
            good = simulate.sweep_goodput(outcomes, w.target)
        else:
            target = search.Target(w, s.gpus, a.gpus_per_node, a.cross_node_gbps, max_requests=10**9)
            searcher = search.Searcher(p, target)
            guess = min(searcher.prefill_guess(s) if s.prefill else 1e9, searcher.decode_guess(s))
            found = search.goodput(lambda r, _g, s=s: simulate.sweep(s, w, [r])[0], guess, w.target)
            outcomes = found.points
            good = simulate.sweep_goodput(outcomes, w.target)
        result = _result(s, w, outcomes, good)
        print(f"== {s.preset.name} ({s.gpus} GPU(s), pages {[i.n_pages for i in s.decode]}): simulated")
        print(stats.format_table(result), flush=True)
        results.append(result)
    print("predicted per-GPU goodput: " + ", ".join(f"{r['label']} {r['goodput']['per_gpu']:.3g}" for r in results))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"profile": a.profile, "results": results}, f, indent=1)


def search_(a) -> None:
    from jdisagg.plan import profile as prof
    from jdisagg.plan import search, simulate, system
    from jdisagg.preset import load_preset

    p, w = prof.load(a.profile), _workload(a)
    current = load_preset(a.mesh) if a.mesh else None
    gpus = a.gpus or (current.device_count() if current else 1)
    if gpus < 1 or a.gpus_per_node < 1 or a.rate < 0 or a.cross_node_gbps <= 0:
        raise ValueError("--gpus and --gpus_per_node must be >= 1, --rate >= 0, --cross_node_gbps > 0")
    rate = a.rate
    if current is not None:
        s = system.build(current, p, gpus_per_node=a.gpus_per_node, cross_node_gbps=a.cross_node_gbps)
        if w.name == "trace":
            [o] = simulate.sweep(s, w, [w.trace_rate()])
            verdict = "still meets" if o.attainment >= w.target else "no longer meets"
            print(
                f"current preset {current.name} {verdict} the target on the trace: attainment {o.attainment:.1%} "
                f"(target {w.target:.0%}) at its {w.trace_rate():.3g} req/s"
            )
            rate = rate or w.trace_rate()
        else:
            print(f"current preset {current.name}: {s.gpus} GPU(s)")
    target = search.Target(w, gpus, a.gpus_per_node, a.cross_node_gbps, rate)
    plan = search.search(p, target, jobs=a.jobs, top=a.top, progress=lambda m: print(f"  {m}", flush=True))
    print(search.table(plan, w.slo))
    if plan.dropped:
        print(f"left out (memory or profile): {'; '.join(plan.dropped)}")
    if a.out:
        with open(a.out, "w") as f:
            f.write(plan.toml)
        print(f"{PROG}: wrote {a.out}: python -m jdisagg.serve --mesh {a.out} --model {p.model}")
    if a.json_out:
        rows = [
            {"placement": c.layout.name, "gpus": c.gpus, "rate": c.rate, "per_gpu": c.per_gpu, "copies": c.copies}
            | {"limit": c.limit}
            for c in plan.candidates
        ]
        with open(a.json_out, "w") as f:
            json.dump({"plan": rows, "phases": plan.phases, "seconds": plan.seconds, "toml": plan.toml}, f, indent=1)


def calibrate(a) -> None:
    import dataclasses

    from jdisagg.plan import calibrate as cal
    from jdisagg.plan import profile as prof
    from jdisagg.preset import load_preset

    p = prof.load(a.profile)
    token_s, rate, measured, simulated = cal.host_token_seconds(
        p, load_preset(a.mesh), cal.read_result(a.result), a.humaneval_path or None
    )
    out = a.out or a.profile
    dataclasses.replace(p, host_token_s=token_s, source=out).save(out)
    print(
        f"host cost per streamed token {1e6 * token_s:.1f} us: simulated TPOT p50 {1e3 * simulated:.1f} ms against "
        f"{1e3 * measured:.1f} ms measured at {rate:g} req/s on {a.mesh}; wrote {out}"
    )


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.command == "profile":
        platform.simulate_cpu_devices()
    from jdisagg.plan.search import NoPlacement
    from jdisagg.plan.system import DoesNotFit

    try:
        {"profile": profile, "calibrate": calibrate, "simulate": simulate, "search": search_}[a.command](a)
    except (ValueError, FileNotFoundError, NoPlacement, DoesNotFit) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
