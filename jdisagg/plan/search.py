"""Placement search: each phase's (tp, pp) and the number of prefill and decode instances that
maximize per-GPU goodput (DistServe, DESIGN.md section 1), against colocated and chunked
replicas, by simulation (``jdisagg.plan.simulate``) on a profile.

Steps:

1. **Per phase** (Algorithm 1's inner loops): for every prefill layout (tp) the goodput of one
   prefill instance against the TTFT SLO alone (its requests end at the first token), and
   for every decode layout (tp, pp) the goodput of one decode instance against the TPOT SLO
   alone (prompts prefilled in no time); for colocated and chunked layouts, one replica
   against both SLOs. Each goodput is a bisection on the rate (``goodput``), each point one
   simulation, stopped early once it cannot reach the target.
2. **Units**: n prefill + m decode instances of one prefill and one decode layout, on
   ``n * |P| + m * |D|`` GPUs, estimated at ``min(n * g_P, m * g_D)`` req/s; a colocated or
   chunked replica is a unit of its own. *High node affinity* (Algorithm 1: the cross-node
   link moves a prefix fast) lets a unit span nodes; *low node affinity* (Algorithm 2) keeps
   every unit inside one node, so a prefix moves only over the node's links (jdisagg's
   prefill holds all layers on one tensor-parallel mesh, so "the prefill and decode segments
   holding the same layers on the same node" means a decode instance sits on the node of
   every prefill instance that feeds it). The affinity follows ``--cross_node_gbps``:
   high when the mean prefix crosses nodes in under a tenth of the TPOT SLO.
3. **Verify**: the best units by estimate are simulated whole (both SLOs, transfer and
   decode queueing included). The deployment is as many copies of a unit as the GPUs (or
   ``--rate``) call for; with ``--rate`` Algorithm 1's ``n = ceil(R / g_P)``,
   ``m = ceil(R / g_D)`` sizes the disaggregated units instead.
4. **Deploy**: the best deployments are simulated whole too, all copies in one server
   process (one interpreter streams every token, so copies need not add up); their goodput
   on the GPUs given ranks the candidates, colocated and chunked replicas among them, so the
   plan is never worse than those baselines on the simulated workload.

Only placements whose weights, page pool and prefill buffer fit the device memory (the
engine's own sizing, ``system.build``) are considered. Every simulation is deterministic, so
the same inputs give the same plan.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence

from jdisagg.bench import stats
from jdisagg.bench.stats import Slo
from jdisagg.plan import preset_out, simulate
from jdisagg.plan.profile import Profile
from jdisagg.plan.simulate import Arrivals, Outcome, Workload
from jdisagg.plan.system import DoesNotFit, System, build
from jdisagg.preset import MeshPreset

REL_TOL = 0.04  # bisection stops when the bracket is this narrow (relative)
MAX_SIMS = 10  # simulations per goodput at most


class NoPlacement(ValueError):
    """Nothing fits, or nothing meets the SLOs (the message says which, and the best found)."""


# ---- goodput by bisection ----------------------------------------------------------------------


@dataclasses.dataclass
class Goodput:
    """A goodput found by simulation: the rate (req/s), the points it took, and the first
    point that missed the target (what limits the system is read from it)."""

    rate: float
    points: list[Outcome]
    miss: Outcome | None

    @property
    def best_attainment(self) -> float:
        return max((o.attainment for o in self.points), default=0.0)


def goodput(evaluate: Callable[[float, bool], Outcome], guess: float, target: float, step: float = 1.3) -> Goodput:
    """Brackets the rate where attainment crosses ``target`` from ``guess`` (``step`` apart),
    then bisects it to ``REL_TOL``; the answer is ``stats.goodput`` over the points simulated."""
    seen: dict[float, Outcome] = {}

    def at(rate: float) -> Outcome:
        if rate not in seen:
            seen[rate] = evaluate(rate, True)
        return seen[rate]

    lo = hi = None
    rate = max(guess, 1e-3)
    for _ in range(MAX_SIMS):
        if at(rate).attainment >= target:
            lo = rate
            if hi is not None:
                break
            rate *= step
        else:
            hi = rate
            if lo is not None or rate < 1e-3:
                break
            rate /= step
    while lo is not None and hi is not None and (hi - lo) > REL_TOL * lo and len(seen) < MAX_SIMS:
        mid = (lo + hi) / 2
        if at(mid).attainment >= target:
            lo = mid
        else:
            hi = mid
    outs = sorted(seen.values(), key=lambda o: o.rate)
    if lo is None:
        return Goodput(0.0, outs, outs[0])
    good = stats.goodput([o.rate for o in outs], [o.attainment for o in outs], target)
    miss = next((o for o in outs if o.attainment < target), None)
    return Goodput(good.rate, outs, miss)


# ---- candidates ------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    """A unit of placement and what simulation says of it."""

    layout: preset_out.Layout
    estimate: float = 0.0  # req/s, from the per-phase goodputs
    limit: str = ""
    copies: int = 1  # in the deployment
    found: Found | None = None  # the simulation of it whole
    deployed: float | None = None  # req/s of its deployment (all copies) simulated whole

    @property
    def gpus(self) -> int:
        return self.layout.gpus

    @property
    def rate(self) -> float:
        return self.found.rate if self.found else self.estimate

    @property
    def per_gpu(self) -> float:
        return self.rate / self.gpus


@dataclasses.dataclass
class Plan:
    """The search's answer: candidates ranked, the deployment, and how long it took."""

    candidates: list[Candidate]  # best first (verified ones)
    best: Candidate
    copies: int
    gpus_used: int
    affinity: str  # "high" or "low"
    preset: MeshPreset
    toml: str
    phases: dict[str, float]  # per-phase goodputs (req/s per instance), by layout name
    dropped: list[str]  # layouts that do not fit memory, with why
    seconds: float = 0.0
    simulations: int = 0
    servers: int = 1  # servers that each run ``preset`` (one per node with low affinity)

    @property
    def goodput(self) -> float:
        """Predicted req/s of the whole deployment."""
        b = self.best
        return b.deployed if b.deployed is not None else b.rate * self.copies


@dataclasses.dataclass(frozen=True)
class Target:
    """What to plan for."""

    workload: Workload
    gpus: int
    gpus_per_node: int = 8
    cross_node_gbps: float = 25.0
    rate: float = 0.0  # 0: maximize per-GPU goodput on the GPUs given
    max_requests: int = 2000  # counted per simulated point at most (shorter windows at high rates)

    @property
    def slo(self) -> Slo:
        return self.workload.slo


def affinity(profile: Profile, target: Target) -> str:
    """ "high" when the workload's mean prefix crosses nodes in under a tenth of the TPOT SLO."""
    if target.gpus <= target.gpus_per_node:
        return "high"  # one node: every prefix moves inside it anyway
    mean_in, _ = target.workload.mean_lengths(500)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[profile.cfg.dtype]
    nbytes = mean_in * profile.cfg.kv_bytes_per_token(itemsize)
    return "high" if nbytes / (target.cross_node_gbps * 1e9 / 8) <= 0.1 * target.slo.tpot_s else "low"


class Searcher:
    """Runs the simulations of one search, counting them."""

    def __init__(self, profile: Profile, target: Target):
        self.profile, self.target = profile, target
        self.w = target.workload
        self.simulations = 0
        mean_in, mean_out = self.w.mean_lengths(1000)
        self.mean_in, self.mean_out = mean_in, mean_out

    def system(self, layout: preset_out.Layout, copies: int = 1, instant_prefill: bool = False) -> System:
        preset = preset_out.make_preset(self.profile, layout, copies, self.target.gpus_per_node)
        return build(
            preset,
            self.profile,
            gpus_per_node=self.target.gpus_per_node,
            cross_node_gbps=self.target.cross_node_gbps,
            instant_prefill=instant_prefill,
        )

    def outcome(self, system: System, rate: float, slo: Slo, phase: str = "", give_up: bool = True) -> Outcome:
        w = self.w
        if w.name != "trace" and rate * w.duration_s > self.target.max_requests:
            # A fast system: a shorter counted window still holds max_requests, after the same
            # warm-up (a shorter one would measure a system still filling up).
            w = dataclasses.replace(w, duration_s=self.target.max_requests / rate)
        [arrivals] = simulate.points(w, [rate], system.preset.max_seq_len)
        if phase == "prefill":  # requests end at their first token
            arrivals = Arrivals(arrivals.rate, arrivals.times, [(i, 1) for i, _ in arrivals.lengths], arrivals.warmup)
        self.simulations += 1
        return simulate.simulate(system, arrivals, slo, self.w.target if give_up else 0.0)

    def goodput(self, system: System, guess: float, slo: Slo, phase: str = "", step: float = 1.3) -> Goodput:
        return goodput(lambda r, g: self.outcome(system, r, slo, phase, g), guess, self.w.target, step)

    # ---- capacity guesses (where bisection starts) -----------------------------------------

    def prefill_guess(self, system: System) -> float:
        inst = system.prefill[0]
        budget = inst.spec.token_budget
        per_call = max(1, budget // max(1, round(self.mean_in)))
        return 0.8 * per_call / system.prefill_seconds(inst, [round(self.mean_in)] * per_call)

    def decode_guess(self, system: System) -> float:
        inst = system.decode[0]
        b = inst.spec.max_batch
        ctx = round(self.mean_in + self.mean_out / 2)
        from jdisagg.sched.scheduler import DecodeBatch

        batch = DecodeBatch([None] * b, [0] * b, [ctx] * b, [[0]] * b, [None] * b, [1] * b)
        step = system.step_seconds(inst, batch) + system.host_seconds(b)
        rows = min(b, max(1.0, self.w.slo.tpot_s / step * b)) if step > self.w.slo.tpot_s else b
        return 0.8 * rows / (step * max(1.0, self.mean_out))


def _phase_layouts(profile: Profile, node_gpus: int):
    prefill = [c.tp for c in profile.configs if c.prefill is not None and c.tp <= node_gpus]
    decode = [(c.tp, c.pp) for c in profile.configs if c.devices <= node_gpus]
    return sorted(set(prefill)), sorted(set(decode))


def limit(g: Goodput, slo: Slo, system: System) -> str:
    """What limits a system, read at the first simulated rate that missed the target: the
    prefill queue (TTFT misses while prefill is free to run), memory (preemptions, or
    prefixes waiting for pages while a slot is free), transfer (pulling prefixes takes a
    quarter of the decode loop or more), or the decode batch (TPOT misses, or TTFT misses
    because decode cannot take more rows: a full batch or the prefill buffer pushing back)."""
    o = g.miss
    if o is None:
        return "none found (every simulated rate met the target)"
    results = [r for r in o.results if r.ok]
    ttft_miss = sum(1 for r in results if stats.ttft(r) > slo.ttft_s)
    tpot_miss = sum(1 for r in results if (t := stats.tpot(r)) is not None and t > slo.tpot_s)
    mean = stats.server_breakdown(results)["mean"]
    ms = {k: 1e3 * (mean[k] or 0.0) for k in ("queue_s", "prefill_s", "decode_queue_s", "transfer_s")}
    misses = f"at {o.rate:.3g} req/s: {ttft_miss} TTFT / {tpot_miss} TPOT misses of {len(o.results)}"
    if (mean["preemptions"] or 0.0) > 0.01 or o.page_bound > 0.05:
        pre = mean["preemptions"] or 0.0
        return f"memory ({misses}; {pre:.2f} preemptions/request, {o.page_bound:.0%} page-bound steps)"
    if o.host_busy > 0.8:
        return f"host ({misses}; the one server process is busy {o.host_busy:.0%} of the time streaming tokens)"
    if o.pull_share > 0.25:
        return f"transfer ({misses}; pulls take {o.pull_share:.0%} of the decode loop)"
    # TTFT misses come from the prefill queue, unless decode is what holds prefill back: its
    # buffer pushes back (disaggregated), or a replica's rows sit at max_batch (colocated).
    pushed_back = system.instant_prefill or ms["decode_queue_s"] > 0.5 * ms["queue_s"] > 0
    if system.preset.colocated:
        pushed_back = o.full_batch > 0.5
    if ttft_miss >= tpot_miss and not pushed_back:
        return f"prefill queue ({misses}; queue {ms['queue_s']:.0f} ms, prefill {ms['prefill_s']:.0f} ms mean)"
    return (
        f"decode batch ({misses}; {o.full_batch:.0%} of steps at max_batch, decode queue "
        f"{ms['decode_queue_s']:.0f} ms mean)"
    )


@dataclasses.dataclass
class Found:
    """What one goodput job sends back (small, so it crosses processes cheaply)."""

    kind: str  # prefill, decode, colocated, chunked, unit
    layout: preset_out.Layout
    rate: float = 0.0
    best_attainment: float = 0.0
    lowest_rate: float = 0.0
    limit: str = ""
    error: str = ""  # DoesNotFit
    simulations: int = 0


def _job(args) -> Found:
    profile, target, kind, layout, guess, copies = args
    if kind == "deployment":  # large systems: half the requests per point still count a thousand
        target = dataclasses.replace(target, max_requests=target.max_requests // 2)
    s = Searcher(profile, target)
    inf, slo = math.inf, target.slo
    try:
        system = s.system(layout, copies, instant_prefill=kind == "decode")
    except DoesNotFit as e:
        return Found(kind, layout, error=str(e))
    phase = "prefill" if kind == "prefill" else ""
    # Prefill alone answers to TTFT; decode (behind a prefill that takes no time, whose buffer
    # still pushes back when decode falls behind) and whole systems to both SLOs.
    slo = Slo(slo.ttft_s, inf) if kind == "prefill" else slo
    step = 1.12 if guess and kind == "unit" else 1.3  # a unit's estimate from the phases is close
    if not guess:
        guess = {"prefill": s.prefill_guess, "decode": s.decode_guess}.get(kind)
        if guess is None:
            guess = s.decode_guess(system)
            if system.prefill:
                guess = min(guess, s.prefill_guess(system))
        else:
            guess = guess(system)
    g = s.goodput(system, guess, slo, phase, step)
    low = min((o.rate for o in g.points), default=0.0)
    return Found(kind, layout, g.rate, g.best_attainment, low, limit(g, slo, system), simulations=s.simulations)


def _map(jobs: Sequence, workers: int) -> list[Found]:
    """``_job`` over ``jobs`` in order: in worker processes (forked) when there are several."""
    if workers <= 1 or len(jobs) <= 1:
        return [_job(j) for j in jobs]
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(_job, jobs))


def search(profile: Profile, target: Target, *, jobs: int = 0, top: int = 2, progress: Callable | None = None) -> Plan:
    """The best placement for ``target`` on the profile's hardware (see the module docstring)."""
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    workers = jobs or min(4, os.cpu_count() or 1)
    aff = affinity(profile, target)
    node_gpus = min(target.gpus, target.gpus_per_node)
    unit_gpus = node_gpus if aff == "low" else target.gpus
    prefill_tps, decode_layouts = _phase_layouts(profile, node_gpus)
    L = preset_out.Layout
    dropped: list[str] = []
    simulations = 0

    # 1. Per phase, and whole replicas.
    phase_jobs = [(profile, target, "prefill", L("disaggregated", tp, 1, 1, 1, 0), 0.0, 1) for tp in prefill_tps]
    phase_jobs += [(profile, target, "decode", L.disaggregated(tp, tp, pp, 1, 1), 0.0, 1) for tp, pp in decode_layouts]
    for tp in prefill_tps:
        for kind in ("colocated", "chunked"):
            if kind == "chunked" and profile.config(tp, 1).mixed is None:
                continue
            if preset_out.attention_compatible(profile, [], [(tp, 1)]):
                phase_jobs.append((profile, target, kind, L.replica(kind, tp), 0.0, 1))
    phases: dict[str, float] = {}
    prefill_g: dict[int, float] = {}
    decode_g: dict[tuple[int, int], float] = {}
    found: list[Found] = []
    for f in _map(phase_jobs, workers):
        simulations += f.simulations
        if f.error:
            dropped.append(f"{f.kind} {f.layout.name}: {f.error}")
            continue
        phases[f"{f.kind} {f.layout.name}"] = f.rate
        say(f"{f.kind} {f.layout.name}: {f.rate:.3g} req/s per instance")
        if f.kind == "prefill":
            prefill_g[f.layout.prefill_tp] = f.rate
        elif f.kind == "decode":
            decode_g[(f.layout.decode_tp, f.layout.decode_pp)] = f.rate
        else:
            found.append(f)

    # 2. Units of n prefill + m decode instances, by estimate.
    units: list[Candidate] = []
    for ptp, gp in prefill_g.items():
        for (dtp, dpp), gd in decode_g.items():
            if gp <= 0 or gd <= 0 or not preset_out.attention_compatible(profile, [(ptp, 1)], [(dtp, dpp)]):
                continue
            if target.rate:
                shapes = [(math.ceil(target.rate / gp), math.ceil(target.rate / gd))]
            else:
                shapes = [
                    (n, m) for n in range(1, unit_gpus + 1) for m in range(1, unit_gpus + 1) if math.gcd(n, m) == 1
                ]
            for n, m in shapes:
                layout = L.disaggregated(ptp, dtp, dpp, n, m)
                if layout.gpus <= (target.gpus if target.rate and aff == "high" else unit_gpus):
                    units.append(Candidate(layout, min(n * gp, m * gd)))
    for c in units:
        c.copies = _copies(c, target, aff)
    replicas = []
    for f in found:
        c = Candidate(f.layout, f.rate, limit=f.limit, found=f)
        c.copies = _copies(c, target, aff)
        replicas.append(c)
    floor = max((_deployed(c, target) for c in replicas), default=0.0)
    units = worth_verifying(units, target, top, floor)

    # 3. Verify the best units, simulated whole; rank them with the best replicas.
    verify = [(profile, target, "unit", c.layout, c.estimate, 1) for c in units]
    estimates = {c.layout: c.estimate for c in units}
    for f in _map(verify, workers):
        simulations += f.simulations
        if f.error:
            dropped.append(f"{f.layout.name}: {f.error}")
            continue
        say(f"verified {f.layout.name}: {f.rate:.3g} req/s (estimate {estimates[f.layout]:.3g})")
        c = Candidate(f.layout, estimates[f.layout], limit=f.limit, found=f)
        c.copies = _copies(c, target, aff)
        replicas.append(c)
    best_of: dict = {}
    for c in sorted(replicas, key=lambda c: _rank(c, target)):
        best_of.setdefault(c.layout.kind if c.layout.kind != "disaggregated" else c.layout, c)
    ranked = sorted(best_of.values(), key=lambda c: _rank(c, target))

    # 4. The best deployments simulated whole: the copies of a unit share one server process
    # (one interpreter streams every token), so they need not add up.
    # The best first; the others only if their copies add up to more than it reached.
    deploy = [c for c in ranked[:top] if c.copies > 1 and c.rate > 0]
    for batch in (deploy[:1], deploy[1:]):
        reached = max((_deployed(c, target) for c in ranked if c.deployed is not None), default=0.0)
        batch = [c for c in batch if c.copies * c.rate > reached]
        n = [_per_server(c, target, aff) for c in batch]
        jobs_ = [(profile, target, "deployment", c.layout, c.rate * k, k) for c, k in zip(batch, n, strict=True)]
        for c, k, f in zip(batch, n, _map(jobs_, workers), strict=True):
            simulations += f.simulations
            if not f.error:
                c.deployed, c.limit = f.rate * math.ceil(c.copies / k), f.limit
                added = c.copies * c.rate
                say(f"deployed {c.copies} x [{c.layout.name}]: {c.deployed:.3g} req/s (copies add up to {added:.3g})")
    ranked.sort(key=lambda c: _rank(c, target))
    if not ranked:
        raise NoPlacement(
            f"{profile.model} fits no placement on {target.gpus} GPU(s) of "
            f"{profile.memory_per_device / 2**30:.1f} GiB each: " + "; ".join(dropped[:2])
        )
    best = ranked[0]
    if best.rate <= 0:
        reach = max(ranked, key=lambda c: c.found.best_attainment)
        raise NoPlacement(
            f"no placement meets TTFT <= {target.slo.ttft_s:g} s and TPOT <= {target.slo.tpot_s:g} s for "
            f"{target.workload.target:.0%} of requests; the best reaches {reach.found.best_attainment:.1%} "
            f"attainment ({reach.layout.name} at {reach.found.lowest_rate:.3g} req/s)"
        )
    if best.copies * best.gpus > target.gpus:
        raise NoPlacement(
            f"{target.rate:g} req/s needs {best.copies * best.gpus} GPUs with the best placement "
            f"({best.layout.name}, {best.rate:.3g} req/s per copy); {target.gpus} given"
        )
    # Low affinity over several nodes: every node serves on its own (one server per node, its
    # own scheduler), so no prefix leaves its node; the preset is one node's.
    per_server = _per_server(best, target, aff)
    servers = math.ceil(best.copies / per_server)
    preset = preset_out.make_preset(profile, best.layout, per_server, target.gpus_per_node)
    lines = preset_out.header(profile, target, best, best.copies, aff)
    if servers > 1:
        lines.append(f"One node of {servers}: run one server per node with this preset, behind a router.")
    toml = preset_out.to_toml(preset, lines)
    seconds = time.perf_counter() - start
    return Plan(
        ranked,
        best,
        best.copies,
        best.copies * best.gpus,
        aff,
        preset,
        toml,
        phases,
        dropped,
        seconds,
        simulations,
        servers,
    )


def _deployed(c: Candidate, target: Target) -> float:
    """Goodput (req/s) of ``c``'s deployment (simulated whole when it was, else its copies
    added up); 0 when it needs more GPUs than given."""
    if c.copies * c.gpus > target.gpus:
        return 0.0
    return c.deployed if c.deployed is not None else c.copies * c.rate


def _per_server(c: Candidate, target: Target, aff: str) -> int:
    """Copies of ``c`` that one server process runs (one node's worth with low affinity)."""
    if aff == "low" and c.copies * c.gpus > target.gpus_per_node:
        return max(1, target.gpus_per_node // c.gpus)
    return c.copies


def _rank(c: Candidate, target: Target):
    """Best first: with ``--rate``, the fewest GPUs that carry it; else the most goodput on the
    GPUs given (so idle GPUs count against a placement), then the best per GPU."""
    if target.rate:
        carries = c.rate > 0 and (c.deployed is None or c.deployed >= target.rate)
        need = c.copies * c.gpus if carries else math.inf
        return (need if need <= target.gpus else math.inf, -c.per_gpu)
    return (-_deployed(c, target), -c.per_gpu, c.gpus)


def worth_verifying(units: list[Candidate], target: Target, top: int, floor: float, within: float = 0.9):
    """The ``top`` units whose estimated deployment comes within ``within`` of the best
    estimate and of ``floor`` (the best replica's simulated deployment)."""
    units = sorted(units, key=lambda c: _rank(c, target))
    if not units:
        return []
    if target.rate:
        best = _rank(units[0], target)[0]
        return [c for c in units if _rank(c, target)[0] <= best][:top]
    bar = within * max(_deployed(units[0], target), floor)
    # The best by estimate always, so the table shows a disaggregated placement simulated whole.
    return [units[0], *[c for c in units[1:] if _deployed(c, target) >= bar > 0][: top - 1]]


def _copies(best: Candidate, target: Target, aff: str) -> int:
    """Copies of a unit in its deployment: enough for ``--rate`` (a disaggregated unit sized
    for it is one copy), else as many as fit the GPUs (units inside nodes with low affinity)."""
    if target.rate:
        if best.layout.kind == "disaggregated" or best.rate <= 0:
            return 1
        return math.ceil(target.rate / best.rate - 1e-9)
    if aff == "low" or best.gpus <= target.gpus_per_node:
        nodes, rest = divmod(target.gpus, target.gpus_per_node)
        return max(1, nodes * (target.gpus_per_node // best.gpus) + rest // best.gpus)
    return max(1, target.gpus // best.gpus)


def table(plan: Plan, slo: Slo) -> str:
    """The terminal table of a plan: the ranked placements, then the deployment."""
    rows = [
        f"{'rank':>4}  {'placement (unit)':<42} {'GPUs':>4} {'req/s':>7} {'/GPU':>6} {'copies':>6} "
        f"{'total':>7}  what limits it",
    ]
    for i, c in enumerate(plan.candidates, 1):
        if c.deployed is not None:
            total = f"{c.deployed:.3g}"
        else:
            total = f"{c.rate:.3g}" if c.copies == 1 else f"<={c.copies * c.rate:.3g}"
        rows.append(
            f"{i:>4}  {c.layout.name:<42} {c.gpus:>4} {c.rate:>7.3g} {c.per_gpu:>6.3g} {c.copies:>6} "
            f"{total:>7}  {c.limit}"
        )
    if any(c.deployed is None and c.copies > 1 for c in plan.candidates):
        rows.append("<=: copies added up (not simulated whole: already below the best deployment)")
    b = plan.best
    rows.append(
        f"plan: {plan.copies} x [{b.layout.name}] on {plan.gpus_used} GPU(s)"
        + (f" ({plan.servers} servers, one per node)" if plan.servers > 1 else "")
        + f", {plan.affinity} node affinity: "
        f"predicted {plan.goodput:.3g} req/s ({plan.goodput / plan.gpus_used:.3g} req/s/GPU) at "
        f"{slo.ttft_s:g} s TTFT / "
        f"{slo.tpot_s:g} s TPOT ({plan.simulations} simulations, {plan.seconds:.1f} s)"
    )
    return "\n".join(rows)
