"""``jdisagg.bench.micro`` on 8 simulated CPU devices with tiny sizes: every benchmark yields
rows with a positive time and a finite ratio, and the transfer rows count the prefix's bytes."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jdisagg.bench import micro
from jdisagg.model import config

TINY = dict(
    model="tiny-llama",
    mesh="cpu-tp4-pp2tp2",
    prefill_shapes=((1, 32), (2, 64)),
    decode_batches=(4,),
    decode_contexts=(16, 40),
    transfer_lengths=(32, 64),
    pp_batch=4,
    pp_context=32,
    pp_steps=3,
    repeats=2,
)


def test_every_benchmark_gives_finite_ratios(tmp_path, monkeypatch):
    # Three of the pp cases (each compiles a program; test_pp_cases lists them all).
    cases = micro.pp_cases
    monkeypatch.setattr(micro, "pp_cases", lambda b: [cases(b)[i] for i in (0, 1, 4)])
    out = tmp_path / "micro.json"
    rows = micro.run(micro.Options(**TINY, json_out=str(out)))
    report = json.loads(out.read_text())
    assert len(report["rows"]) == len(rows)
    assert {r["bench"] for r in report["rows"]} == set(micro.BENCHMARKS)
    assert report["ceilings"]["matmul_flops"] > 0 and report["ceilings"]["copy_bytes"] > 0
    for r in report["rows"]:
        assert r["time_ms"] > 0 and r["achieved"] > 0 and r["limit"] > 0, r
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    # 2 prefill shapes; 1 batch x 2 contexts; 2 transfer rows per length; 3 pp cases.
    counts = {b: sum(r["bench"] == b for r in report["rows"]) for b in micro.BENCHMARKS}
    assert counts == {"ceilings": 2, "prefill": 2, "decode": 2, "transfer": 4, "pp": 3}
    pp = [(r["name"], r["shape"], r["tokens"], r["devices"]) for r in report["rows"] if r["bench"] == "pp"]
    assert pp == [
        ("decode pp=1 tp=1 micro=1 steps=1", "B=4 S=32", 4, 1),
        ("decode pp=2 tp=1 micro=2 steps=1", "B=4 S=32", 4, 2),
        ("decode pp=2 tp=2 micro=2 steps=3", "B=8 S=32", 24, 4),  # a call of 3 steps: 3 tokens per row
    ]
    assert [r["note"].split("; ")[1:] for r in report["rows"] if r["bench"] == "pp"][0] == ["1.00x pp=1", "dot"]
    # The decode rows run the preset's instance: pp=2 x tp=2, PIPELINE_STEPS tokens per call.
    assert {(r["name"], r["tokens"]) for r in report["rows"] if r["bench"] == "decode"} == {
        ("decode pp=2 tp=2 micro=2 steps=8", 4 * 8)
    }
    cfg = config.shape("tiny-llama")
    for r in report["rows"]:
        if r["bench"] == "transfer":  # k and v [L, T, K, H] in float32 (T = 32 and 64 are length buckets)
            assert r["bytes"] == 2 * cfg.n_layers * r["tokens"] * cfg.n_kv_heads * cfg.head_dim * 4, r
            assert r["tokens"] in (32, 64) and "different split" in r["note"]
        if r["bench"] == "decode":
            assert r["bytes"] > cfg.kv_bytes_per_token(4) * r["tokens"]  # weights plus KV
    prefill = [r for r in report["rows"] if r["bench"] == "prefill"]
    assert [r["tokens"] for r in prefill] == [32, 128]


def test_pp_cases():
    """pp=1; pp=2 filling and draining every step; pp=2 in steady state at the same rows and at
    twice them; pp=2 x tp=2 at twice and four times them (8 devices here)."""
    b = micro.Bench(micro.Options(**TINY))
    assert micro.pp_cases(b) == [(1, 1, 1, 4), (2, 1, 1, 4), (2, 1, 3, 4), (2, 1, 3, 8), (2, 2, 3, 8), (2, 2, 3, 16)]
    b = micro.Bench(micro.Options(**{**TINY, "pp_steps": 0, "pp_batch": 0}))
    assert micro.pp_cases(b)[2] == (2, 1, 8, 8)  # PIPELINE_STEPS; the preset's decode max_batch (8)


def test_prefill_flops_formula():
    cfg = config.shape("tiny-llama")
    b = micro.Bench.__new__(micro.Bench)  # only the fields prefill_flops reads
    b.cfg, b.layer_params = cfg, 1000
    bsz, t = 2, 8
    expected = (
        2 * 1000 * bsz * t
        + 2 * bsz * cfg.dim * cfg.vocab_size
        + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t * t * bsz
    )
    assert np.isclose(micro.prefill_flops(b, bsz, t), expected)


ONE_TO_ONE = """page_size = 16
max_seq_len = 256
[[prefill]]
devices = [0]
[[decode]]
devices = [1]
max_batch = 4
pages = 64
"""


def test_command_line(tmp_path):
    out, mesh = tmp_path / "cli.json", tmp_path / "one_to_one.toml"
    mesh.write_text(ONE_TO_ONE)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jdisagg.bench.micro",
            "--which",
            "ceilings,decode,transfer",
            "--model",
            "tiny-llama",
            "--mesh",
            str(mesh),
            "--decode_batches",
            "2",
            "--decode_contexts",
            "40",
            "--transfer_lengths",
            "32",
            "--repeats",
            "2",
            "--decode_attention",
            "pallas",
            "--json_out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "reshard.transfer" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["bench"] for r in report["rows"]] == ["ceilings"] * 2 + ["decode"] + ["transfer"] * 2
    assert (report["unroll_layers"], report["decode_attention"]) == (False, "pallas")
    assert "pallas kernel reads each request's pages in place" in report["rows"][2]["note"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--unroll_layers", "maybe"], "should be one of"),
        (["--decode_attention", "fast"], "should be one of"),
        (["--repeats", "x"], "--repeats"),
        (["--mesh", "no-such-mesh"], "no-such-mesh"),
    ],
)
def test_bad_flags_exit_2(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "jdisagg.bench", "micro", "--which", "ceilings", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
