"""The planner with hand-checkable answers: fits, the profile file, the simulator against the
M/D/1 queue and a decode case worked out by hand, the search's known optimum of a synthetic
latency model, Algorithm 2's node-local KV, the trace recorder and the CLI's errors. Nothing
here compiles a model."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jdisagg import toml_file
from jdisagg.bench import workloads
from jdisagg.bench.stats import Slo, tpot, ttft
from jdisagg.model.config import shape
from jdisagg.plan import __main__ as plan_cli
from jdisagg.plan import calibrate, latency, preset_out, search, simulate, system
from jdisagg.plan import profile as prof
from jdisagg.plan.latency import Fit
from jdisagg.plan.trace import TraceRecorder
from jdisagg.preset import parse
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Request, State

CFG = shape("tiny-llama")
NO_TRANSFER = Fit("linear", ("one", "bytes"), (0.0, 0.0))


def _preset(prefill_batch=1, decode_batch=8, pages=256, max_seq_len=512):
    return parse(
        {
            "name": "hand",
            "page_size": 16,
            "max_seq_len": max_seq_len,
            "prefill": [{"devices": [0], "max_batch": prefill_batch, "token_budget": 512}],
            "decode": [{"devices": [1], "max_batch": decode_batch, "pages": pages}],
        },
        "hand",
    )


# ---- fits -----------------------------------------------------------------------------------


def test_nnls_matches_a_known_solution():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (40, 3))
    x = np.array([2.0, 0.0, 0.5])
    b = a @ x
    assert np.allclose(latency.nnls(a, b), x, atol=1e-9)
    # An unconstrained fit would want a negative coefficient; NNLS clamps it to 0.
    b2 = a @ np.array([1.0, -1.0, 1.0])
    assert (latency.nnls(a, b2) >= 0).all()


def test_fit_recovers_the_paper_model_and_reports_held_out_error():
    rng = np.random.default_rng(1)
    points = []
    for _ in range(30):
        lengths = rng.integers(16, 512, rng.integers(1, 5)).tolist()
        x = latency.prefill_features(lengths, 2048)
        points.append((x, 0.004 + 2e-5 * x["tokens"] + 1e-9 * x["sq_tokens"]))
    f = latency.fit("prefill", points)
    assert f.form == "paper"
    assert np.allclose(f.coef, (0.004, 2e-5, 1e-9), rtol=1e-6)
    assert f.errors["paper"]["held_out"] and f.errors["paper"]["mean"] < 1e-6
    assert f.errors["paper"]["points"] == 8  # a quarter of the points were kept out


def test_fit_prefers_the_bucketed_form_when_the_row_sets_the_cost():
    points = []
    for lengths in ([100], [200], [300], [60, 60], [500], [120, 300], [700], [1000], [64] * 8, [900, 100]):
        row = 1 << (sum(lengths) - 1).bit_length()  # a power-of-two token bucket
        points.append((latency.prefill_features(lengths, row), 0.002 + 3e-5 * row))
    f = latency.fit("prefill", points)
    assert f.form == "bucketed"
    assert f.errors["bucketed"]["mean"] < 0.01 < f.errors["paper"]["mean"]


# ---- the profile file ---------------------------------------------------------------------------


def _synthetic(**kw):
    kinds = kw.pop("kinds", {"prefill": (0.01, 0, 0), "decode": (0.02, 0)})
    return prof.synthetic(CFG, {(1, 1): kinds}, transfer=NO_TRANSFER, **kw)


def test_profile_round_trip(tmp_path):
    p = _synthetic()
    path = tmp_path / "p.json"
    p.save(path)
    q = prof.load(path)
    assert q.as_dict() == prof.from_dict(json.loads(path.read_text()), "x").as_dict()
    assert q.cfg == p.cfg and q.config(1, 1).decode == p.config(1, 1).decode and q.source == str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="other"), "not a jdisagg profile"),
        (lambda d: d.pop("serving"), "malformed profile"),
        (lambda d: d["configs"][0]["decode"].update(coef=[-1.0, 0.0]), "coefficients must be finite and >= 0"),
        (lambda d: d["configs"][0]["decode"].update(features=["one", "nope"]), "do not match"),
        (lambda d: d.update(configs=[]), "no configs"),
    ],
)
def test_malformed_profiles_are_refused(change, message):
    d = _synthetic().as_dict()
    change(d)
    with pytest.raises(ValueError, match=message):
        prof.from_dict(d, "p.json")


# ---- the simulator ---------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.3, 0.6])
def test_prefill_queue_follows_m_d_1(rho):
    """One prefill instance, one prompt per call taking D, Poisson arrivals at R: mean TTFT is
    D + R D^2 / (2 (1 - R D)) (requests end at their first token)."""
    d = 0.01
    s = system.build(_preset(), _synthetic(kinds={"prefill": (d, 0, 0), "decode": (0.001, 0)}))
    rate, n = rho / d, 20000
    w = simulate.Workload("fixed", Slo(1, 1), input_len=100, output_len=1, warmup_s=0, duration_s=n / rate, seed=3)
    [out] = simulate.sweep(s, w, [rate])
    assert len(out.results) > 0.95 * n
    mean = np.mean([ttft(r) for r in out.results])
    assert mean == pytest.approx(d + rate * d * d / (2 * (1 - rate * d)), rel=0.03)


def test_decode_tpot_follows_the_latency_model_by_hand():
    """Four 100-token prompts arrive together, are prefilled in one call, pulled, and decode 10
    more tokens in steps of 4 rows. Step k (k = 1..10) reads a context of 4 * (100 + k) tokens,
    so TPOT = C4 + C5 * 4 * 105.5 exactly."""
    c4, c5 = 0.02, 1e-5
    p = _synthetic(kinds={"prefill": (0.05, 0, 0), "decode": (c4, c5)})
    s = system.build(_preset(prefill_batch=4), p)
    arrivals = simulate.Arrivals(4.0, np.zeros(4), [(100, 11)] * 4, 0)
    out = simulate.simulate(s, arrivals, Slo(1, 1))
    for r in out.results:
        assert ttft(r) == pytest.approx(0.05)
        assert tpot(r) == pytest.approx(c4 + c5 * 4 * 105.5)
    assert out.attainment == 1.0


def test_same_seed_same_numbers_and_the_bench_requests():
    p = _synthetic(kinds={"prefill": (0.005, 1e-5, 0), "decode": (0.01, 1e-6)})
    s = system.build(_preset(prefill_batch=4, decode_batch=16), p)
    w = simulate.Workload("chat", Slo(0.5, 0.1), warmup_s=1, duration_s=3, seed=7)
    a, b = simulate.sweep(s, w, [4, 8]), simulate.sweep(s, w, [4, 8])
    assert [o.attainment for o in a] == [o.attainment for o in b]
    assert [[ttft(r) for r in o.results] for o in a] == [[ttft(r) for r in o.results] for o in b]
    # The requests are the ones jdisagg.bench run sends for this sweep (lengths, clipped).
    [pt4, pt8] = simulate.points(w, [4, 8], 512)
    times = workloads.arrival_times(8, 1.0, 7, duration_s=4)
    pairs = workloads.lengths_for("chat", len(times), 7)
    assert np.allclose(pt8.times, times) and pt8.lengths == [workloads.clip(i, o, 512)[:2] for i, o in pairs]
    assert pt4.lengths == pt8.lengths[: len(pt4.times)]


def test_pages_run_out_and_requests_are_preempted_not_lost():
    p = _synthetic(kinds={"prefill": (0.001, 0, 0), "decode": (0.001, 0)})
    s = system.build(_preset(prefill_batch=4, decode_batch=8, pages=40), p)  # 39 pages of 16 tokens
    arrivals = simulate.Arrivals(8.0, np.zeros(8), [(100, 200)] * 8, 0)  # 8 x 300 tokens > 624
    out = simulate.simulate(s, arrivals, Slo(10, 10))
    assert [r.num_tokens for r in out.results] == [200] * 8
    assert sum(r.server["preemptions"] for r in out.results) > 0


def test_colocated_and_chunked_baselines_run():
    p = _synthetic(kinds={"prefill": (0.01, 1e-5, 0), "decode": (0.01, 1e-6)})
    for role, extra in (("colocated", {"token_budget": 512}), ("chunked", {"chunk_tokens": 64})):
        preset = parse(
            {"page_size": 16, "max_seq_len": 512, role: [{"devices": [0], "max_batch": 8, "pages": 256, **extra}]},
            role,
        )
        s = system.build(preset, p)
        arrivals = simulate.Arrivals(2.0, np.array([0.0, 0.5]), [(300, 20), (100, 20)], 0)
        out = simulate.simulate(s, arrivals, Slo(10, 10))
        assert [r.num_tokens for r in out.results] == [20, 20]
        if role == "chunked":  # 300 prompt tokens take 5 chunks of 64, each a mixed step
            assert ttft(out.results[0]) > 4 * 0.01


# ---- the search ---------------------------------------------------------------------------


def _search_profile():
    """Prefill: 13.3 ms per prompt (alone); decode: 20 ms per step of up to 16 rows. Per
    instance, prefill carries ~3 x what decode does, so 1 prefill + 3 decode is the best unit
    on 4 GPUs: min(n g_P, m g_D) / (n + m) is largest at n:m = 1:3 (0.75 g_D per GPU against
    0.67 for 1:2 and 0.5 for 1:1). A colocated replica stalls its rows for every prefill, so
    its TPOT (SLO 25 ms against 20 ms steps) breaks early."""
    serving = prof.Serving(16, 1024, (128, 256, 512, 1024), "dot", False, 1, 16, (), 128)
    kinds = {"prefill": (0.0133, 0, 0), "decode": (0.02, 0)}
    return prof.synthetic(CFG, {(1, 1): kinds}, serving=serving, transfer=NO_TRANSFER, memory_per_device=2**30)


def _fixed(**kw):
    return simulate.Workload("fixed", Slo(0.2, 0.025), input_len=512, output_len=32, warmup_s=2, duration_s=8, **kw)


def test_search_returns_the_known_optimum():
    plan = search.search(_search_profile(), search.Target(_fixed(), gpus=4), jobs=1)
    assert plan.best.layout == preset_out.Layout.disaggregated(1, 1, 1, 1, 3)
    assert plan.copies == 1 and plan.gpus_used == 4
    kinds = {c.layout.kind for c in plan.candidates}
    assert {"disaggregated", "colocated", "chunked"} <= kinds  # never worse than the baselines
    assert all(plan.best.rate * plan.copies >= c.rate * c.copies for c in plan.candidates)
    # The preset written is the one simulated: one prefill, three decode instances, L_m budget.
    preset = parse(toml_file.tomllib.loads(plan.toml), "plan.toml")
    assert [i.role for i in preset.instances] == ["prefill", "decode", "decode", "decode"]
    assert [i.devices for i in preset.instances] == [(0,), (1,), (2,), (3,)]
    assert preset.prefill[0].token_budget == 2048
    assert "Predicted goodput" in plan.toml


def test_algorithm_2_keeps_every_kv_move_inside_a_node():
    p = _search_profile()
    w = _fixed()
    low = search.search(p, search.Target(w, gpus=8, gpus_per_node=4, cross_node_gbps=1.0, max_requests=400), jobs=1)
    assert low.affinity == "low" and low.servers == 2 and low.gpus_used == 8
    assert all(d < 4 for i in low.preset.instances for d in i.devices)  # one node's preset
    s = system.build(low.preset, p, gpus_per_node=4)
    moves = s.kv_moves()
    assert moves and all(src == dst for src, dst in moves)
    assert all(len({d // 4 for d in i.devices}) == 1 for i in low.preset.instances)
    high = search.search(p, search.Target(w, gpus=8, gpus_per_node=4, cross_node_gbps=1e6, max_requests=400), jobs=1)
    assert high.affinity == "high"


def test_nothing_fits_and_slos_nothing_meets():
    tiny_memory = prof.synthetic(shape("opt-13b").replace(dtype="bfloat16"), {(1, 1): {"decode": (0.01, 0)}})
    tiny_memory = tiny_memory.__class__(**{**tiny_memory.__dict__, "memory_per_device": 2**30})
    with pytest.raises(search.NoPlacement, match="fits no placement"):
        search.search(tiny_memory, search.Target(_fixed(), gpus=2), jobs=1)
    impossible = simulate.Workload("fixed", Slo(0.001, 0.001), input_len=512, output_len=8, warmup_s=0, duration_s=4)
    with pytest.raises(search.NoPlacement, match=r"no placement meets .* the best reaches"):
        search.search(_search_profile(), search.Target(impossible, gpus=2), jobs=1)


# ---- the trace recorder ---------------------------------------------------------------------------


def test_trace_recorder_writes_what_read_trace_reads(tmp_path):
    clock = iter([100.0]).__next__
    path = tmp_path / "t" / "trace.jsonl"
    with TraceRecorder(path, clock=clock) as rec:
        for arrival, n_in, n_out, reason in (
            (101.5, 12, 3, "length"),
            (100.25, 7, 2, "stop"),
            (102, 5, 1, "cancelled"),
        ):
            r = Request([1] * n_in, SamplingParams(max_tokens=8))
            r.arrival, r.output, r.finish_reason, r.state = arrival, [2] * n_out, reason, State.FINISHED
            rec.record(r)
    assert (rec.written, rec.skipped) == (2, 1)
    entries = workloads.read_trace(path)
    assert [(e.timestamp, e.input_len, e.output_len, e.prompt) for e in entries] == [
        (0.25, 7, 2, None),
        (1.5, 12, 3, None),
    ]


def test_plan_from_a_trace_says_whether_the_current_preset_meets_it(tmp_path):
    profile = tmp_path / "p.json"
    _search_profile().save(profile)
    trace = tmp_path / "trace.jsonl"
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.exponential(1 / 20, 200))
    trace.write_text("".join(json.dumps({"timestamp": float(x), "input_len": 512, "output_len": 32}) + "\n" for x in t))
    mesh = tmp_path / "current.toml"
    mesh.write_text(
        preset_out.to_toml(preset_out.make_preset(_search_profile(), preset_out.Layout.replica("colocated", 1)))
    )
    out = _cli(
        "search",
        "--profile",
        profile,
        "--trace",
        trace,
        "--mesh",
        mesh,
        "--slo_ttft",
        "0.2",
        "--slo_tpot",
        "0.025",
        "--gpus",
        "4",
        "--jobs",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert "current preset plan-colocated1 no longer meets the target on the trace" in out.stdout
    assert "plan:" in out.stdout


# ---- the CLI ---------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jdisagg.plan", *map(str, args)], capture_output=True, text=True)


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    good = tmp_path / "p.json"
    _search_profile().save(good)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "jdisagg.plan.profile/1", "configs": []}')
    cases = [
        ("search", "--profile", good, "--workload", "poetry"),
        ("search", "--profile", bad),
        ("search", "--profile", tmp_path / "missing.json"),
        ("simulate", "--profile", good, "--mesh", "no-such-preset"),
        ("search", "--profile", good, "--gpus", "-1", "--workload", "fixed"),
        ("search", "--bogus"),
    ]
    for case in cases:
        with pytest.raises(SystemExit) as e:
            plan_cli.main([str(a) for a in case])
        err = capsys.readouterr().err
        assert e.value.code == 2, (case, err)
        assert err.count("\n") == 1 and err.startswith("jdisagg.plan: error: "), err
    assert _cli("search", "--profile", bad).returncode == 2  # and as a process


def test_cli_simulate_prints_the_bench_table(tmp_path):
    good = tmp_path / "p.json"
    _search_profile().save(good)
    mesh = tmp_path / "m.toml"
    mesh.write_text(
        preset_out.to_toml(preset_out.make_preset(_search_profile(), preset_out.Layout.disaggregated(1, 1, 1, 1, 3)))
    )
    out = _cli(
        "simulate",
        "--profile",
        good,
        "--mesh",
        mesh,
        "--workload",
        "fixed",
        "--input_len",
        "512",
        "--output_len",
        "32",
        "--slo_ttft",
        "0.2",
        "--slo_tpot",
        "0.025",
        "--rates",
        "20,40",
        "--duration_s",
        "4",
    )
    assert out.returncode == 0, out.stderr
    assert "attain" in out.stdout and "predicted per-GPU goodput" in out.stdout
    assert math.isfinite(float(out.stdout.rsplit(" ", 1)[-1]))


def test_host_cost_per_token_adds_to_every_step_and_calibrates_back():
    """The hand case above with 1 ms of host time per streamed token: each step of 4 rows takes
    4 ms more. Calibrating a profile without it on that TPOT finds the 1 ms again."""
    c4, c5 = 0.02, 1e-5
    p = dataclasses.replace(_synthetic(kinds={"prefill": (0.05, 0, 0), "decode": (c4, c5)}), host_token_s=1e-3)
    s = system.build(_preset(prefill_batch=4), p)
    out = simulate.simulate(s, simulate.Arrivals(4.0, np.zeros(4), [(100, 11)] * 4, 0), Slo(1, 1))
    assert [tpot(r) for r in out.results] == pytest.approx([c4 + c5 * 4 * 105.5 + 4e-3] * 4)
    w = simulate.Workload("fixed", Slo(1, 1), input_len=100, output_len=11, warmup_s=1, duration_s=8)
    [o] = simulate.sweep(s, w, [1.0])  # about one request at a time: TPOT grows 1:1 with the cost
    measured = float(np.median([tpot(r) for r in o.results]))
    result = {
        "workload": "fixed",
        "workload_options": {"input_len": 100, "output_len": 11},
        "slo": {"ttft_s": 1, "tpot_s": 1},
        "target_attainment": 0.9,
        "warmup_s": 1,
        "duration_s": 8,
        "points": [{"rate": 1.0, "tpot": {"p50": measured}}],
    }
    token_s, rate, got, sim = calibrate.host_token_seconds(dataclasses.replace(p, host_token_s=0.0), _preset(4), result)
    assert rate == 1.0 and got == measured and sim == pytest.approx(measured, rel=1e-3)
    assert token_s == pytest.approx(1e-3, rel=0.01)
