"""Calibrating the one host cost a profile cannot time on its own: the server's host time per
streamed token (``Profile.host_token_s``: the listener, the event loop and gRPC, which the
instance loops wait for because one interpreter runs them all).

From one measured point of ``jdisagg.bench run`` (a result file and the preset it ran), the
cost is set so that the simulated median TPOT at that point's rate equals the measured one
(bisection; TPOT grows with it). The lowest-rate point is used: the least queueing, so the
median TPOT is mostly step time. Everything else predicted with the profile stays a
prediction.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np

from jdisagg.bench.stats import Slo, tpot
from jdisagg.plan import simulate, system
from jdisagg.plan.profile import Profile
from jdisagg.preset import MeshPreset


def read_result(path: str | Path) -> dict:
    data = Path(path).read_bytes()
    try:
        return json.loads(gzip.decompress(data) if str(path).endswith(".gz") else data)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read bench result {path}: {e}") from None


def workload_of(result: dict, humaneval_path: str | None) -> simulate.Workload:
    """The workload a bench result measured, as the simulator sends it."""
    opts = result.get("workload_options") or {}
    return simulate.Workload(
        result["workload"],
        Slo(**result["slo"]),
        result["target_attainment"],
        result.get("cv", 1.0),
        result.get("seed", 0),
        result.get("warmup_s", 0.0),
        result.get("duration_s", 0.0) or 12.0,
        opts.get("input_len", 512),
        opts.get("output_len", 64),
        humaneval_path,
    )


def host_token_seconds(profile: Profile, preset: MeshPreset, result: dict, humaneval_path: str | None = None):
    """(seconds per streamed token, the rate it was fitted at, measured TPOT p50, simulated)."""
    if result.get("workload") == "trace" or not result.get("points"):
        raise ValueError("calibrate from a rate sweep of jdisagg.bench run (not a trace)")
    w = workload_of(result, humaneval_path)
    point = min(result["points"], key=lambda p: p["rate"])
    measured = point["tpot"]["p50"]
    if measured is None:
        raise ValueError("the lowest-rate point has no TPOT (one-token requests?)")

    def simulated(token_s: float) -> float:
        p = dataclasses.replace(profile, host_token_s=token_s)
        [o] = simulate.sweep(system.build(preset, p), w, [point["rate"]])
        return float(np.median([t for r in o.results if (t := tpot(r)) is not None]))

    lo, hi = 0.0, 2e-3
    if simulated(lo) >= measured:
        return 0.0, point["rate"], measured, simulated(lo)
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulated(mid) < measured else (lo, mid)
    token_s = (lo + hi) / 2
    return token_s, point["rate"], measured, simulated(token_s)
