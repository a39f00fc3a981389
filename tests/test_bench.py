"""jdisagg.bench: metrics against hand-computed cases, workload statistics, and a short real run."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jdisagg.bench import stats, workloads
from jdisagg.bench.stats import RequestResult, Slo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "jdisagg.bench", *args], capture_output=True, text=True, timeout=timeout
    )


def _req(sent, times, error="", out_len=None):
    return RequestResult(input_len=4, output_len=out_len or len(times), sent=sent, token_times=list(times), error=error)


# ---- metrics --------------------------------------------------------------------------------


def test_per_request_latencies():
    r = _req(1.0, [1.5, 1.7, 1.7, 2.1])  # tokens 2 and 3 came in one message
    assert stats.ttft(r) == pytest.approx(0.5)
    assert stats.tpot(r) == pytest.approx(0.6 / 3)
    assert stats.itls(r) == pytest.approx([0.2, 0.0, 0.4])
    assert stats.e2e(r) == pytest.approx(1.1)


def test_one_token_outputs_meet_tpot_and_leave_tpot_stats():
    one = _req(0.0, [0.3])
    assert stats.tpot(one) is None and stats.itls(one) == []
    assert stats.meets_slo(one, Slo(ttft_s=0.5, tpot_s=1e-9))
    two = _req(0.0, [0.1, 0.5])
    summary = stats.summarize_point(1.0, [one, two], Slo(1.0, 1.0), gpus=1)
    assert summary["tpot"]["count"] == 1 and summary["tpot"]["mean"] == pytest.approx(0.4)
    assert summary["ttft"]["count"] == 2 and summary["ttft"]["mean"] == pytest.approx(0.2)


def test_attainment_counts_failures_as_misses():
    slo = Slo(ttft_s=0.5, tpot_s=0.125)  # times below are exact binary fractions
    results = [
        _req(0.0, [0.25, 0.3125, 0.375]),  # hit
        _req(1.0, [1.5, 1.625]),  # hit: TTFT and TPOT exactly at the SLO
        _req(0.0, [0.75, 0.875]),  # TTFT miss
        _req(0.0, [0.125, 0.5, 0.875]),  # TPOT miss (0.375)
        _req(0.0, [], error="UNAVAILABLE"),  # failed
        _req(0.0, [0.1, 0.2], error="INTERNAL"),  # failed mid-stream
    ]
    assert [stats.meets_slo(r, slo) for r in results] == [True, True, False, False, False, False]
    assert stats.attainment(results, slo) == pytest.approx(2 / 6)
    summary = stats.summarize_point(2.0, results, slo, gpus=1)
    assert summary["num_ok"] == 4 and summary["errors"] == {"UNAVAILABLE": 1, "INTERNAL": 1}


def test_goodput_interpolates_between_bracketing_points():
    g = stats.goodput([1, 2, 4], [1.0, 0.95, 0.5], 0.9)
    assert g.rate == pytest.approx(2 + (0.95 - 0.9) / (0.95 - 0.5) * 2) and not g.lower_bound
    assert g.rate == pytest.approx(2.2222, abs=1e-4)
    assert stats.goodput([4, 1, 2], [0.5, 1.0, 0.95]).rate == pytest.approx(g.rate)  # order does not matter
    assert stats.goodput([1, 2, 4], [0.8, 0.5, 0.1]) == stats.Goodput(0.0, lower_bound=False)
    assert stats.goodput([1, 2, 4], [1.0, 0.99, 0.9]) == stats.Goodput(4, lower_bound=True)
    assert stats.goodput([1, 2, 4, 8], [1.0, 0.8, 0.95, 0.2]).rate == pytest.approx(1 + 0.1 / 0.2)  # first crossing
    with pytest.raises(ValueError):
        stats.goodput([1, 2], [1.0])


def test_percentiles_and_per_gpu_rate():
    d = stats.distribution([5, 1, 4, 2, 3])
    assert d == {"count": 5, "mean": 3.0, "p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}
    assert stats.distribution([])["p99"] is None
    summary = stats.summarize_point(8.0, [_req(0.0, [0.1, 0.2])], Slo(1, 1), gpus=4)
    assert summary["per_gpu_rate"] == 2.0


def test_server_breakdown_sums_and_means():
    a, b, failed = _req(0, [1]), _req(0, [1]), _req(0, [], error="CANCELLED")
    a.server = dict(queue_s=0.1, prefill_s=0.2, transfer_s=0.01, transfer_bytes=100, decode_queue_s=0.0, preemptions=1)
    b.server = dict(queue_s=0.3, prefill_s=0.4, transfer_s=0.03, transfer_bytes=300, decode_queue_s=0.2, preemptions=0)
    s = stats.server_breakdown([a, b, failed])
    assert s["count"] == 2
    assert s["sum"] == pytest.approx(
        dict(queue_s=0.4, prefill_s=0.6, transfer_s=0.04, transfer_bytes=400, decode_queue_s=0.2, preemptions=1)
    )
    assert s["mean"]["transfer_bytes"] == 200 and s["mean"]["queue_s"] == pytest.approx(0.2)


# ---- SLO scale ------------------------------------------------------------------------------

HAND_SLO = Slo(ttft_s=0.5, tpot_s=0.125)


def _result(points, label="sys", gpus=2, slo=None, target=0.4, workload="fixed"):
    """A result file's data built the way ``loadgen.run_benchmark`` builds it, through JSON;
    ``points`` maps each rate to its requests; the SLO defaults to ``HAND_SLO``."""
    slo = slo or HAND_SLO
    summaries = []
    for rate, results in points.items():
        summary = stats.summarize_point(rate, results, slo, gpus)
        summary["requests"] = [stats.request_record(r, slo) for r in results]
        summaries.append(summary)
    good = stats.goodput([s["rate"] for s in summaries], [s["attainment"] for s in summaries], target)
    result = {
        "label": label,
        "workload": workload,
        "workload_options": {},
        "cv": 1.0,
        "seed": 0,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "target_attainment": target,
        "gpus": gpus,
        "goodput": {"rate": good.rate, "per_gpu": good.rate / gpus, "lower_bound": good.lower_bound},
        "points": summaries,
    }
    return json.loads(json.dumps(result))


def _lat(ttft, tpot=None, error=""):
    """A request with this TTFT and TPOT (two tokens; one token when ``tpot`` is None), sent at 0."""
    return _req(0.0, [ttft] if tpot is None else [ttft, ttft + tpot], error=error)


# With HAND_SLO, target 0.4 and 2 GPUs: at scale k a request needs TTFT <= 0.5k and TPOT <= 0.125k.
# Times are binary fractions, so each comparison at scales 0.25, 0.5, 1 and 2 is exact.
HAND = {
    2.0: [_lat(0.125, 0.03125), _lat(0.25, 0.0625), _lat(0.5, 0.125), _lat(0.75)],  # the last: one token
    4.0: [_lat(0.25, 0.125), _lat(0.75, 0.0625), _lat(0.125, 0.03125, error="INTERNAL"), _lat(0.125, 0.25)],
}


def test_slo_scale_rescoring_by_hand():
    result = _result(HAND)
    # scale 1 (0.5, 0.125): rate 2 meets 3/4 (the one-token TTFT 0.75 misses); rate 4 meets 1/4 (TTFT, failed, TPOT).
    assert [p["attainment"] for p in result["points"]] == [0.75, 0.25]
    expected = {  # scale: (attainments, goodput rate, lower bound), goodput = r0 + (a0 - 0.4) / (a0 - a1) * (r1 - r0)
        0.25: ([0.25, 0.0], 0.0, False),  # (0.125, 0.03125): only the first request; rate 2 already misses 0.4
        0.5: ([0.5, 0.0], 2 + 0.1 / 0.5 * 2, False),  # (0.25, 0.0625): the first two
        1.0: ([0.75, 0.25], 2 + 0.35 / 0.5 * 2, False),
        2.0: ([1.0, 0.75], 4.0, True),  # (1, 0.25): all but the failed one; every rate meets 0.4
    }
    for scale, (attainments, rate, lower_bound) in expected.items():
        rescored = stats.rescore(result, scale)
        assert rescored["slo"] == {"ttft_s": 0.5 * scale, "tpot_s": 0.125 * scale}
        assert rescored["attainment"] == attainments, scale
        good = rescored["goodput"]
        assert good["rate"] == pytest.approx(rate) and good["per_gpu"] == pytest.approx(rate / 2), scale
        assert good["lower_bound"] == lower_bound, scale
    assert stats.rescore(result, 1.0)["goodput"]["per_gpu"] == pytest.approx(1.7)


def test_slo_scale_1_reproduces_the_stored_result():
    result = _result(HAND)
    rescored = stats.rescore(result, 1.0)
    assert rescored["attainment"] == [p["attainment"] for p in result["points"]]  # exactly, not approx
    assert rescored["goodput"] == result["goodput"]
    # and on the stored GPU results, whose latencies are not binary fractions
    stored = [json.loads(gzip.decompress(f.read_bytes())) for f in sorted(ROOT.glob("docs/bench/*.json.gz"))]
    assert stored, "no stored results under docs/bench"
    stored = [r for r in stored if "points" in r]
    for r in stored:
        rescored = stats.rescore(r, 1.0)
        assert rescored["attainment"] == [p["attainment"] for p in r["points"]], r["label"]
        assert rescored["goodput"] == r["goodput"], r["label"]
        slo = Slo(**r["slo"])
        assert all(stats.record_meets_slo(q, slo) == q["meets_slo"] for p in r["points"] for q in p["requests"])


def test_record_rule_is_the_request_rule():
    slo = HAND_SLO
    requests = [
        _lat(0.5, 0.125),  # both exactly at the SLO
        _lat(0.25, 0.25),  # TPOT miss
        _lat(0.75, 0.0625),  # TTFT miss
        _lat(0.25),  # one token: no TPOT, only the TTFT counts
        _lat(0.75),
        _lat(0.125, 0.0625, error="INTERNAL"),  # failed mid-stream with good latencies
        _req(0.0, [], error="UNAVAILABLE"),  # failed before a token
        _req(0.0, []),  # no error but no token either
    ]
    expected = [True, False, False, True, False, False, False, False]
    for scale in (0.25, 1.0, 2.0, 1000.0):
        scaled = slo.scaled(scale)
        records = [json.loads(json.dumps(stats.request_record(r, slo))) for r in requests]
        by_request = [stats.meets_slo(r, scaled) for r in requests]
        assert [stats.record_meets_slo(q, scaled) for q in records] == by_request, scale
    assert [stats.meets_slo(r, slo) for r in requests] == expected
    loose = slo.scaled(1000.0)
    assert [stats.meets_slo(r, loose) for r in requests] == [True] * 5 + [False] * 3  # failures never meet
    assert stats.record_meets_slo({"error": "", "ttft": 0.25, "tpot": None, "num_tokens": 1}, Slo(0.5, 1e-9))


def test_slo_scale_table_and_ratios():
    base = _result(HAND, label="colocated")
    # a second system on 1 GPU: at rate 2 all meet at every scale; at rate 4 half do up to scale 1, all at 2
    other = _result(
        {2.0: [_lat(0.125, 0.03125)] * 4, 4.0: [_lat(0.125, 0.03125)] * 2 + [_lat(1.0, 0.03125)] * 2},
        label="disagg",
        gpus=1,
    )
    table = stats.slo_scale_table([base, other], [2, 0.5, 1, 0.5, 0.25])
    assert table["scales"] == [0.25, 0.5, 1, 2]
    assert [s["label"] for s in table["systems"]] == ["colocated", "disagg"]
    other_good = [s["goodput"] for s in table["systems"][1]["by_scale"]]
    # scales 0.25 to 1: rate 4 attains 0.5 >= 0.4, a lower bound of 4 req/s on 1 GPU; scale 2: all meet
    assert [(g["per_gpu"], g["lower_bound"]) for g in other_good] == [(4.0, True)] * 4
    ratios = table["ratios"]
    assert [(r["numerator"], r["denominator"]) for r in ratios] == [("disagg", "colocated")]
    r = ratios[0]["by_scale"]
    assert r[0] is None  # colocated goodput 0
    assert r[1]["bound"] == ">=" and r[1]["value"] == pytest.approx(4.0 / 1.2)
    assert r[2]["bound"] == ">=" and r[2]["value"] == pytest.approx(4.0 / 1.7)
    assert r[3] is None  # both lower bounds
    assert stats.goodput_ratio({"per_gpu": 2.0, "lower_bound": False}, {"per_gpu": 4.0, "lower_bound": True}) == {
        "value": 0.5,
        "bound": "<=",
    }
    text = stats.format_slo_table(table)
    lines = text.splitlines()
    assert "TTFT <= k * 0.5 s, TPOT <= k * 0.125 s" in lines[0] and "40% attainment" in lines[0]
    assert lines[1].split()[-3:] == ["disagg", "/", "colocated"]
    assert lines[2].split() == ["0.25", "0.125", "0.0312", "0", ">=4", "-"]
    assert lines[3].split() == ["0.5", "0.25", "0.0625", "1.2", ">=4", ">=3.33"]
    assert lines[4].split() == ["1", "0.5", "0.125", "1.7", ">=4", ">=2.35"]
    assert lines[5].split() == ["2", "1", "0.25", ">=2", ">=4", "-"]
    assert lines[6].startswith(">=:") and lines[7].startswith("-:")


def test_slo_scale_table_rejects_bad_input():
    base = _result(HAND)
    for scales in ([], [0.0, 1.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="positive"):
            stats.slo_scale_table([base], scales)
    with pytest.raises(ValueError, match="result 2 .* has workload 'chat'"):
        stats.slo_scale_table([base, _result(HAND, workload="chat")], [1.0])
    with pytest.raises(ValueError, match="has slo"):
        stats.slo_scale_table([base, _result(HAND, slo=Slo(1.0, 0.125))], [1.0])
    stripped = _result(HAND, label="old")
    del stripped["points"][1]["requests"]
    with pytest.raises(ValueError, match=r"result 2 \(old\): the point at 4 req/s stores no request records"):
        stats.slo_scale_table([base, stripped], [1.0])


# ---- workloads ------------------------------------------------------------------------------


def test_code_is_humaneval():
    try:
        pairs = workloads.code_lengths()
    except RuntimeError as e:  # no network and no cached copy
        pytest.skip(f"HumanEval unavailable: {e}")
    inputs, outputs = np.array(pairs).T
    assert len(pairs) == 164
    # SmolLM2's tokenizer: prompts mean 139.3 (40..395), canonical solutions mean 58.9 (6..268).
    assert inputs.mean() == pytest.approx(139.3, abs=1.0) and (inputs.min(), inputs.max()) == (40, 395)
    assert outputs.mean() == pytest.approx(58.9, abs=1.0) and (outputs.min(), outputs.max()) == (6, 268)
    lengths = workloads.lengths_for("code", 328, seed=3)
    assert sorted(lengths[:164]) == sorted(pairs) and lengths[164:] == lengths[:164]


def test_chat_and_summarize_distributions():
    chat = np.array(workloads.sample_chat(40_000, np.random.default_rng(0)))
    assert (chat >= 1).all() and (chat.sum(axis=1) < 2048).all()
    assert chat[:, 0].mean() == pytest.approx(477, rel=0.03) and np.median(chat[:, 0]) == pytest.approx(364, rel=0.03)
    assert chat[:, 1].mean() == pytest.approx(226, rel=0.03) and np.median(chat[:, 1]) == pytest.approx(157, rel=0.03)
    summ = np.array(workloads.sample_summarize(20_000, np.random.default_rng(0)))
    assert summ[:, 0].min() >= 1500 and summ[:, 0].max() <= 2000 and summ[:, 0].mean() == pytest.approx(1750, abs=5)
    assert summ[:, 1].min() >= 16 and summ[:, 1].max() <= 48 and summ[:, 1].mean() == pytest.approx(32, abs=0.3)
    assert workloads.lengths_for("chat", 10, seed=1) == workloads.lengths_for("chat", 10, seed=1)  # seeded


def test_fixed_requests_and_clipping():
    assert workloads.lengths_for("fixed", 3, 0, input_len=16, output_len=8) == [(16, 8)] * 3
    assert workloads.clip(100, 20, 512) == (100, 20, False)
    assert workloads.clip(1800, 30, 512) == (482, 30, True)  # the prompt is cut, the output kept
    assert workloads.clip(10, 600, 512) == (1, 511, True)
    requests = workloads.make_requests([(16, 8), (600, 10)], seed=0, vocab_size=256, max_seq_len=512)
    assert [(r.input_len, r.output_len, r.clipped) for r in requests] == [(16, 8, False), (502, 10, True)]
    ids = np.concatenate([r.prompt for r in requests])
    assert len(requests[1].prompt) == 502 and ids.min() >= 3 and ids.max() < 256


def test_trace_files(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 12.0, "input_len": 5, "output_len": 2},
        {"timestamp": 10.0, "prompt": "hello there", "output_len": 3},
        {"timestamp": 11.0, "input_len": 700, "output_len": 4},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    entries = workloads.read_trace(path)
    assert [e.timestamp for e in entries] == [10.0, 11.0, 12.0] and entries[0].prompt == "hello there"
    assert workloads.trace_arrivals(entries, speed=2.0).tolist() == [0.0, 0.5, 1.0]
    requests = workloads.trace_requests(entries, [[7, 8], None, None], seed=0, vocab_size=256, max_seq_len=512)
    assert requests[0].prompt == "hello there" and requests[0].input_len == 2  # text goes as text
    assert (requests[1].input_len, requests[1].output_len, requests[1].clipped) == (508, 4, True)
    long_text = workloads.trace_requests(entries[:1], [list(range(3, 600))], 0, 256, 512)[0]
    assert long_text.prompt == list(range(3, 512)) and long_text.clipped  # cut text goes as ids
    for bad, message in [
        ('{"timestamp": 1, "output_len": 2}', "exactly one"),
        ('{"timestamp": 1, "input_len": 2}', "needs"),
        ("not json", "not JSON"),
        ('{"timestamp": -1, "input_len": 2, "output_len": 2}', "timestamp"),
    ]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            workloads.read_trace(path)


def test_arrival_processes():
    n = 200_000
    poisson = np.diff(workloads.arrival_times(4.0, 1.0, seed=0, num_requests=n))
    assert poisson.mean() == pytest.approx(1 / 4.0, rel=0.01) and poisson.std() / poisson.mean() == pytest.approx(
        1, rel=0.02
    )
    bursty = np.diff(workloads.arrival_times(2.0, 3.0, seed=0, num_requests=n))
    assert bursty.mean() == pytest.approx(0.5, rel=0.03) and bursty.std() / bursty.mean() == pytest.approx(3, rel=0.05)
    smooth = np.diff(workloads.arrival_times(2.0, 0.5, seed=0, num_requests=n))
    assert smooth.std() / smooth.mean() == pytest.approx(0.5, rel=0.02)
    # one pattern per seed, scaled by 1/rate; a duration takes the prefix that fits
    a1 = workloads.arrival_times(1.0, 2.0, seed=5, num_requests=50)
    assert workloads.arrival_times(4.0, 2.0, seed=5, num_requests=50) == pytest.approx(a1 / 4)
    timed = workloads.arrival_times(1.0, 2.0, seed=5, duration_s=a1[30])
    assert a1[0] == 0 and len(timed) == 30 and timed == pytest.approx(a1[:30])


def test_warmup_arrivals_are_sent_but_not_counted():
    import asyncio

    from jdisagg.bench import loadgen

    config = loadgen.BenchConfig("fixed", rates=(2.0, 4.0), duration_s=5.0, warmup_s=3.0, input_len=4, output_len=2)
    config.validate()
    points = asyncio.run(loadgen.plan_points(None, config, vocab_size=100, max_seq_len=64))
    for point in points:
        # one schedule over warm-up + measured time, the same as a plain 8-s point at this rate
        assert point.warmup_s == 3.0
        assert point.arrivals == pytest.approx(workloads.arrival_times(point.rate, 1.0, 0, duration_s=8.0))
        results = [RequestResult(4, 2) for _ in point.arrivals]
        kept = loadgen.measured(point, results)
        late = [r for r, at in zip(results, point.arrivals, strict=True) if at >= 3.0]
        assert 0 < len(kept) < len(results) and all(a is b for a, b in zip(kept, late, strict=True))


# ---- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--target", "127.0.0.1:1", "--model", "tiny-llama", "--rates", "1"], "not both or neither"),
        (["run", "--model", "tiny-llama", "--rates", "1"], "--model needs --mesh"),
        (["run", "--target", "127.0.0.1:1", "--workload", "nope", "--rates", "1"], "unknown workload 'nope'"),
        (["run", "--target", "127.0.0.1:1", "--rates", "1,x"], "comma-separated numbers"),
        (["run", "--target", "127.0.0.1:1", "--rates", "1", "--cv", "abc"], "cv"),
        (["run", "--target", "127.0.0.1:1"], "give --rates"),
        (["run", "--target", "127.0.0.1:1", "--rates", "1", "--duration_s", "5", "--num_requests", "3"], "exactly one"),
        (["run", "--target", "127.0.0.1:1", "--workload", "trace", "--rates", "1"], "needs --trace"),
        (["run", "--target", "127.0.0.1:1", "--rates", "1", "--stop_below", "0.95"], "--stop_below must be in"),
        (["run", "--target", "127.0.0.1:1", "--rates", "1", "--warmup_s", "5"], "--warmup_s goes with --duration_s"),
        (
            ["run", "--target", "127.0.0.1:1", "--rates", "1", "--duration_s", "5", "--warmup_s", "-1"],
            "--warmup_s must",
        ),
        (["plot", "a.json"], "plot needs --out"),
        (["bogus"], "give a command"),
    ],
)
def test_bad_flags_exit_2(args, message):
    proc = _bench(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_slo_command(tmp_path):
    a, b = tmp_path / "colocated.json", tmp_path / "disagg.json"
    a.write_text(json.dumps(_result(HAND, label="colocated")))
    b.write_text(json.dumps(_result({2.0: [_lat(0.125, 0.03125)] * 4, 4.0: [_lat(0.125)] * 4}, label="disagg")))
    png, table = tmp_path / "slo.png", tmp_path / "slo.json"
    proc = _bench("slo", str(a), str(b), "--scales", "0.5,1,2", "--out", str(png), "--json_out", str(table))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[1][-3:] == ["disagg", "/", "colocated"]
    assert rows[2:5] == [
        ["0.5", "0.25", "0.0625", "1.2", ">=2", ">=1.67"],
        ["1", "0.5", "0.125", "1.7", ">=2", ">=1.18"],
        ["2", "1", "0.25", ">=2", ">=2", "-"],
    ]
    data = json.loads(table.read_text())
    assert data["scales"] == [0.5, 1.0, 2.0] and data["workload"] == "fixed"
    assert [s["by_scale"][1]["goodput"]["per_gpu"] for s in data["systems"]] == [pytest.approx(1.7), 2.0]
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000
    assert _bench("slo", str(a)).returncode == 0  # default scales, table only


def test_slo_command_errors(tmp_path):
    good, chat, bare, micro = (tmp_path / f"{n}.json" for n in ("good", "chat", "bare", "micro"))
    good.write_text(json.dumps(_result(HAND)))
    chat.write_text(json.dumps(_result(HAND, workload="chat")))
    stripped = _result(HAND)
    for p in stripped["points"]:
        del p["requests"]
    bare.write_text(json.dumps(stripped))
    micro.write_text(json.dumps({"rows": []}))
    for args, message in [
        ([], "slo takes result JSON files"),
        ([str(tmp_path / "missing.json")], "cannot read"),
        ([str(micro)], "is not a jdisagg.bench result"),
        ([str(good), str(chat)], "has workload 'chat'"),
        ([str(bare)], "stores no request records"),
        ([str(good), "--scales", "1,x"], "--scales takes comma-separated numbers"),
        ([str(good), "--scales", "0,1"], "SLO scales must be positive"),
    ]:
        proc = _bench("slo", *args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def _without_wrote_lines(stdout):
    return [line for line in stdout.splitlines() if not line.startswith("jdisagg.bench: wrote")]


def test_plot_and_slo_read_gzipped_results(tmp_path):
    result = _result(HAND, label="disagg")
    plain, packed = tmp_path / "r.json", tmp_path / "r.json.gz"
    plain.write_text(json.dumps(result, indent=1))
    packed.write_bytes(gzip.compress(json.dumps(result, separators=(",", ":")).encode()))  # as docs/bench stores them
    outputs = []
    for path, table in [(plain, tmp_path / "slo.json"), (packed, tmp_path / "slo.json.gz")]:
        slo_proc = _bench("slo", str(path), "--scales", "0.5,1,2", "--json_out", str(table), timeout=60)
        png = tmp_path / f"{path.name}.png"
        plot_proc = _bench("plot", str(path), "--out", str(png), timeout=60)
        assert slo_proc.returncode == 0 and plot_proc.returncode == 0, slo_proc.stderr + plot_proc.stderr
        outputs.append((_without_wrote_lines(slo_proc.stdout), png.read_bytes()))
    assert outputs[0] == outputs[1] and outputs[0][1].startswith(PNG_MAGIC)
    packed_table = gzip.decompress((tmp_path / "slo.json.gz").read_bytes())  # --json_out FILE.gz: compact, gzipped
    assert json.loads(packed_table) == json.loads((tmp_path / "slo.json").read_text()) and b"\n" not in packed_table


def test_unreadable_gzipped_results_exit_2(tmp_path):
    bad, truncated = tmp_path / "bad.json.gz", tmp_path / "truncated.json.gz"
    bad.write_text(json.dumps(_result(HAND)))  # plain JSON under a .gz name
    truncated.write_bytes(gzip.compress(json.dumps(_result(HAND)).encode())[:100])
    for command, path in [("slo", bad), ("plot", truncated), ("slo", tmp_path / "missing.json.gz")]:
        proc = _bench(command, str(path), "--out", str(tmp_path / "fig.png"), timeout=60)
        assert proc.returncode == 2 and f"cannot read {path}" in proc.stderr, (command, proc.stderr)


def test_micro_is_dispatched():
    proc = _bench("micro", "extra", timeout=120)
    assert proc.returncode == 2 and "jdisagg.bench.micro: error: unexpected arguments" in proc.stderr


# Presets cut to the requests these runs send (a 64-token context): the same layouts with a
# few program shapes, so the servers' warm-ups compile a fraction of the full presets'.
_SMALL_TP2_PP2 = """name = "small-tp2-pp2"
page_size = 16
max_seq_len = 64
[[prefill]]
devices = [0, 1]
tp = 2
max_batch = 4
token_budget = 64
[[decode]]
devices = [2, 3]
pp = 2
max_batch = 4
pages = 32
"""
_SMALL_SINGLE = """name = "small-single"
page_size = 16
max_seq_len = 64
[[colocated]]
devices = [0]
max_batch = 4
token_budget = 64
pages = 32
"""


def test_short_real_run_and_plots(tmp_path):
    out, plots_dir, mesh = tmp_path / "r.json", tmp_path / "plots", tmp_path / "small-tp2-pp2.toml"
    mesh.write_text(_SMALL_TP2_PP2)
    proc = _bench(
        "run", "--model", "tiny-llama", "--mesh", str(mesh), "--workload", "fixed",
        "--input_len", "16", "--output_len", "8", "--rates", "20,40", "--num_requests", "12",
        "--slo_ttft", "10", "--slo_tpot", "10", "--label", "disagg", "--out", str(out),
        "--plots_dir", str(plots_dir), "--noprogress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "goodput at 90% attainment" in proc.stdout
    result = json.loads(out.read_text())
    assert result["label"] == "disagg" and result["gpus"] == 4
    assert [p["rate"] for p in result["points"]] == [20.0, 40.0]
    assert [p["per_gpu_rate"] for p in result["points"]] == [5.0, 10.0]
    assert result["goodput"] == {"rate": 40.0, "per_gpu": 10.0, "lower_bound": True}
    for point in result["points"]:
        assert point["attainment"] == 1.0 and point["num_ok"] == 12 and point["errors"] == {}
        assert len(point["requests"]) == 12
        assert all(r["num_tokens"] == 8 and r["finish_reason"] == "length" for r in point["requests"])
        assert point["server"]["count"] == 12 and point["server"]["sum"]["transfer_bytes"] > 0
        assert 0 < point["ttft"]["p50"] <= point["ttft"]["p99"] < 10
    overlay = tmp_path / "fig.png"
    proc = _bench("plot", str(out), str(out), "--out", str(overlay), timeout=60)
    assert proc.returncode == 0, proc.stderr
    for png in (plots_dir / "attainment.png", plots_dir / "latency_cdf.png", overlay):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_sweep_runs_lowest_rate_first_and_stops_below(tmp_path):
    out, mesh = tmp_path / "r.json", tmp_path / "small-single.toml"
    mesh.write_text(_SMALL_SINGLE)
    proc = _bench(
        "run", "--model", "tiny-llama", "--mesh", str(mesh), "--workload", "fixed",
        "--input_len", "8", "--output_len", "4", "--rates", "40,20,80", "--num_requests", "4",
        "--slo_ttft", "1e-6", "--slo_tpot", "10", "--stop_below", "0.5", "--out", str(out), "--noprogress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped rates 40, 80" in proc.stdout
    result = json.loads(out.read_text())
    assert [p["rate"] for p in result["points"]] == [20.0] and result["skipped_rates"] == [40.0, 80.0]
    assert result["points"][0]["attainment"] == 0.0 and result["points"][0]["num_ok"] == 4
    assert result["goodput"] == {"rate": 0.0, "per_gpu": 0.0, "lower_bound": False}
