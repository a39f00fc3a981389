"""Serving metrics over plain per-request records: latency, SLO attainment, goodput.

Definitions (DESIGN.md section 3), all client-side and in seconds:

* TTFT = first token received - request sent.
* TPOT = (last token time - first token time) / (output tokens - 1). Undefined for a request
  with one output token: such a request meets any TPOT SLO trivially and is left out of the
  TPOT statistics (it still counts in TTFT, E2E and attainment).
* ITL = each gap between consecutive tokens. Tokens that arrive in one stream message share
  its arrival time, so their gaps are 0.
* E2E = last token received - request sent.

A request *meets the SLO* when it finished without error, its TTFT <= the TTFT SLO and its
TPOT (if defined) <= the TPOT SLO. *Attainment* is the fraction of all sent requests that
meet it (failed requests count as misses). *Goodput* is the highest rate whose attainment is
>= the target (0.9 by default), linearly interpolated between the two sweep points that
bracket the target; see ``goodput``.

*SLO scale* k multiplies both SLOs by k (DistServe's tightness axis). ``rescore`` recomputes a
stored result's attainments and goodput at scale k from its request records, with the same
rule as ``meets_slo``, so scale 1 gives back the stored numbers exactly; ``slo_scale_table``
does that for several systems over several scales.

Every function here is pure and works on ``RequestResult`` records or the plain JSON data
made from them, so tests can check them by hand.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)
# LatencyBreakdown fields that the server reports in FinalInfo (jdisagg/proto/jdisagg.proto).
SERVER_FIELDS = ("queue_s", "prefill_s", "transfer_s", "transfer_bytes", "decode_queue_s", "preemptions")


@dataclasses.dataclass
class RequestResult:
    """What the client saw of one request; times are seconds since its rate point started."""

    input_len: int  # prompt tokens sent
    output_len: int  # max_tokens asked for (with ignore_eos, the tokens expected)
    sent: float = 0.0  # when the request was sent
    token_times: list[float] = dataclasses.field(default_factory=list)  # one per output token
    end: float = 0.0  # when the stream ended (finished or failed)
    finish_reason: str = ""  # FinalInfo.finish_reason; "" when no final message came
    error: str = ""  # gRPC status code name (e.g. "UNAVAILABLE"); "" when it succeeded
    error_details: str = ""
    server: dict[str, float] = dataclasses.field(default_factory=dict)  # FinalInfo.latency, SERVER_FIELDS
    clipped: bool = False  # lengths were cut to fit the server's max_seq_len

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.token_times)

    @property
    def num_tokens(self) -> int:
        return len(self.token_times)


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def scaled(self, k: float) -> Slo:
        """Both SLOs times ``k`` (the SLO scale)."""
        return Slo(self.ttft_s * k, self.tpot_s * k)


@dataclasses.dataclass(frozen=True)
class Goodput:
    rate: float  # requests/s at which attainment crosses the target
    lower_bound: bool  # the highest swept rate still met the target: goodput is at least ``rate``

    def record(self, gpus: int) -> dict:
        """As stored in a result: ``{"rate", "per_gpu", "lower_bound"}``."""
        return {"rate": self.rate, "per_gpu": self.rate / gpus, "lower_bound": self.lower_bound}


# ---- per request ----------------------------------------------------------------------------


def ttft(r: RequestResult) -> float | None:
    return r.token_times[0] - r.sent if r.token_times else None


def tpot(r: RequestResult) -> float | None:
    """Mean gap after the first token; None for fewer than two tokens."""
    n = len(r.token_times)
    return (r.token_times[-1] - r.token_times[0]) / (n - 1) if n > 1 else None


def itls(r: RequestResult) -> list[float]:
    return [b - a for a, b in zip(r.token_times, r.token_times[1:], strict=False)]


def e2e(r: RequestResult) -> float | None:
    return r.token_times[-1] - r.sent if r.token_times else None


def meets_slo(r: RequestResult, slo: Slo) -> bool:
    """Finished without error, TTFT within ``slo.ttft_s`` and TPOT (when defined) within ``slo.tpot_s``."""
    return _within_slo(r.error, ttft(r), tpot(r), slo)


def record_meets_slo(record: dict, slo: Slo) -> bool:
    """``meets_slo`` of a stored ``request_record``, so a result can be rescored for another SLO."""
    return _within_slo(record["error"], record["ttft"], record["tpot"], slo)


def _within_slo(error: str, ttft_s: float | None, tpot_s: float | None, slo: Slo) -> bool:
    """The SLO rule. ``ttft_s`` is None when no token came (a miss); ``tpot_s`` is None for one
    output token (only the TTFT counts)."""
    return not error and ttft_s is not None and ttft_s <= slo.ttft_s and (tpot_s is None or tpot_s <= slo.tpot_s)


# ---- over requests --------------------------------------------------------------------------


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 (linear interpolation between order statistics); None when empty."""
    if not len(values):
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}}
    v = np.asarray(values, dtype=np.float64)
    out = {"count": len(v), "mean": float(v.mean())}
    out.update({f"p{q}": float(np.percentile(v, q)) for q in PERCENTILES})
    return out


def attainment(results: Sequence[RequestResult], slo: Slo) -> float:
    """Fraction of requests that meet both SLOs; failed requests count as misses."""
    return _fraction([meets_slo(r, slo) for r in results])


def _fraction(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def goodput(rates: Sequence[float], attainments: Sequence[float], target: float = 0.9) -> Goodput:
    """The rate at which attainment falls to ``target``, from a sweep.

    Points are taken in increasing rate. With the first point that misses the target at
    index i > 0, the answer interpolates linearly between points i-1 (meets) and i (misses):
    ``r0 + (a0 - target) / (a0 - a1) * (r1 - r0)``. If the lowest rate already misses, 0;
    if every rate meets the target, the highest rate, flagged as a lower bound. Taking the
    *first* crossing keeps a noisy, non-monotone curve from claiming a rate past a miss.
    """
    if len(rates) != len(attainments):
        raise ValueError(f"{len(rates)} rates but {len(attainments)} attainments")
    if not rates:
        raise ValueError("goodput needs at least one sweep point")
    points = sorted(zip(rates, attainments, strict=True))
    for i, (r1, a1) in enumerate(points):
        if a1 < target:
            if i == 0:
                return Goodput(0.0, lower_bound=False)
            r0, a0 = points[i - 1]
            return Goodput(r0 + (a0 - target) / (a0 - a1) * (r1 - r0), lower_bound=False)
    return Goodput(points[-1][0], lower_bound=True)


def server_breakdown(results: Sequence[RequestResult]) -> dict:
    """Sum and mean over requests of the server's latency breakdown (those that reported one)."""
    reported = [r.server for r in results if r.server]
    sums = {k: float(sum(s.get(k, 0.0) for s in reported)) for k in SERVER_FIELDS}
    means = {k: (v / len(reported) if reported else None) for k, v in sums.items()}
    return {"count": len(reported), "sum": sums, "mean": means}


def summarize_point(rate: float, results: Sequence[RequestResult], slo: Slo, gpus: int) -> dict:
    """One sweep point as plain JSON values: counts, attainment, latency distributions, throughput."""
    ok = [r for r in results if r.ok]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    start = min((r.sent for r in results), default=0.0)
    stop = max((max(r.end, r.token_times[-1] if r.token_times else 0.0) for r in results), default=0.0)
    wall = stop - start
    tokens = sum(r.num_tokens for r in ok)
    return {
        "rate": rate,
        "per_gpu_rate": rate / gpus,
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_clipped": sum(r.clipped for r in results),
        "errors": dict(Counter(r.error or "NO_TOKENS" for r in results if not r.ok)),
        "attainment": attainment(results, slo),
        "ttft": distribution([ttft(r) for r in ok]),
        "tpot": distribution(tpots),
        "itl": distribution([g for r in ok for g in itls(r)]),
        "e2e": distribution([e2e(r) for r in ok]),
        "duration_s": wall,
        "throughput": {
            "requests_per_s": len(ok) / wall if wall > 0 else None,
            "output_tokens_per_s": tokens / wall if wall > 0 else None,
        },
        "server": server_breakdown(results),
    }


def request_record(r: RequestResult, slo: Slo) -> dict:
    """One request as plain JSON values (for the result file and the CDF plots)."""
    return {
        "input_len": r.input_len,
        "output_len": r.output_len,
        "sent": r.sent,
        "num_tokens": r.num_tokens,
        "finish_reason": r.finish_reason,
        "error": r.error,
        "error_details": r.error_details,
        "clipped": r.clipped,
        "ttft": ttft(r),
        "tpot": tpot(r),
        "e2e": e2e(r),
        "meets_slo": meets_slo(r, slo),
        "server": r.server,
    }


# ---- SLO scale -----------------------------------------------------------------------------

# Results compared over SLO scales must agree on these: the same load and the same scale-1 SLOs.
SAME_ACROSS_SYSTEMS = ("workload", "workload_options", "cv", "slo", "target_attainment")


def rescore(result: dict, scale: float) -> dict:
    """A stored result (``loadgen.run_benchmark``) with both SLOs multiplied by ``scale``.

    Each point's attainment is recomputed from its request records with ``record_meets_slo``
    and the goodput from those with ``goodput``, per GPU as in the result, so ``scale`` 1 gives
    back the stored ``attainment`` of every point and the stored ``goodput`` exactly. Returns
    ``{"scale", "slo", "attainment": [one per point], "goodput": {"rate", "per_gpu", "lower_bound"}}``;
    raises ValueError when a point does not store a record for each of its requests.
    """
    slo = Slo(**result["slo"]).scaled(scale)
    attainments = []
    for p in result["points"]:
        records = p.get("requests")
        if records is None or len(records) != p["num_requests"]:
            stored = "no" if records is None else len(records)
            raise ValueError(
                f"the point at {p['rate']:g} req/s stores {stored} request records for {p['num_requests']} "
                "requests; rescoring needs all of them (results of jdisagg.bench run)"
            )
        attainments.append(_fraction([record_meets_slo(r, slo) for r in records]))
    good = goodput([p["rate"] for p in result["points"]], attainments, result["target_attainment"])
    return {
        "scale": scale,
        "slo": dataclasses.asdict(slo),
        "attainment": attainments,
        "goodput": good.record(result["gpus"]),
    }


def slo_scale_table(results: Sequence[dict], scales: Sequence[float]) -> dict:
    """Per-GPU goodput of each result (system) at each SLO scale, and each one's ratio to the first's.

    The results must agree on ``SAME_ACROSS_SYSTEMS``; scales must be positive (they are
    sorted, duplicates dropped). Returns plain JSON data: ``workload``, ``slo`` (scale 1),
    ``target_attainment``, ``scales``; ``systems``, one per result with its ``label``, ``gpus``,
    ``per_gpu_rates`` and ``by_scale`` (``rescore`` at each scale); and ``ratios``, one per
    result after the first, with per scale a ``goodput_ratio`` of per-GPU goodputs (or None).
    Raises ValueError for bad scales, results that do not agree, or ones without request records.
    """
    if not results:
        raise ValueError("give at least one result")
    if not scales or not all(math.isfinite(k) and k > 0 for k in scales):
        raise ValueError(f"SLO scales must be positive numbers, not {', '.join(f'{k:g}' for k in scales) or 'none'}")
    scales = sorted(set(scales))
    labels = [r.get("label") or f"system {i + 1}" for i, r in enumerate(results)]
    first = results[0]
    for i, r in enumerate(results[1:], 1):
        for key in SAME_ACROSS_SYSTEMS:
            if r.get(key) != first.get(key):
                raise ValueError(
                    f"result {i + 1} ({labels[i]}) has {key} {r.get(key)!r} but result 1 ({labels[0]}) has "
                    f"{first.get(key)!r}: compare runs of one workload with the same SLOs"
                )
    systems = []
    for i, r in enumerate(results):
        try:
            by_scale = [rescore(r, k) for k in scales]
        except ValueError as e:
            raise ValueError(f"result {i + 1} ({labels[i]}): {e}") from None
        per_gpu_rates = [p["per_gpu_rate"] for p in r["points"]]
        systems.append({"label": labels[i], "gpus": r["gpus"], "per_gpu_rates": per_gpu_rates, "by_scale": by_scale})
    ratios = [
        {
            "numerator": s["label"],
            "denominator": systems[0]["label"],
            "by_scale": [
                goodput_ratio(a["goodput"], b["goodput"])
                for a, b in zip(s["by_scale"], systems[0]["by_scale"], strict=True)
            ],
        }
        for s in systems[1:]
    ]
    return {
        "workload": first["workload"],
        "slo": first["slo"],
        "target_attainment": first["target_attainment"],
        "scales": scales,
        "systems": systems,
        "ratios": ratios,
    }


def goodput_ratio(a: dict, b: dict) -> dict | None:
    """``a / b`` of two goodput records (per GPU) as ``{"value", "bound"}``: bound "" when both are
    exact, ">=" when only ``a`` is a lower bound, "<=" when only ``b`` is. None when ``b`` is 0 or
    both are lower bounds (then the ratio could be anything)."""
    if b["per_gpu"] <= 0 or (a["lower_bound"] and b["lower_bound"]):
        return None
    bound = ">=" if a["lower_bound"] else "<=" if b["lower_bound"] else ""
    return {"value": a["per_gpu"] / b["per_gpu"], "bound": bound}


def format_slo_table(table: dict) -> str:
    """The terminal table of ``slo_scale_table``: one row per scale, per-GPU goodput per system, then the ratios."""
    slo, systems, ratios = table["slo"], table["systems"], table["ratios"]
    names = [s["label"] for s in systems] + [f"{r['numerator']} / {r['denominator']}" for r in ratios]
    widths = [max(9, len(n)) for n in names]
    rows = [
        f"per-GPU goodput (req/s/GPU) at {table['target_attainment']:.0%} attainment, {table['workload']} workload; "
        f"SLO scale k: TTFT <= k * {slo['ttft_s']:g} s, TPOT <= k * {slo['tpot_s']:g} s",
        f"{'k':>6} {'TTFT SLO':>9} {'TPOT SLO':>9}  "
        + " ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)),
    ]
    for i, k in enumerate(table["scales"]):
        goods = [s["by_scale"][i]["goodput"] for s in systems]
        cells = [f"{'>=' if g['lower_bound'] else ''}{g['per_gpu']:.3g}" for g in goods]
        cells += ["-" if (q := r["by_scale"][i]) is None else f"{q['bound']}{q['value']:.2f}" for r in ratios]
        scaled = systems[0]["by_scale"][i]["slo"]
        rows.append(
            f"{k:>6g} {scaled['ttft_s']:>9.3g} {scaled['tpot_s']:>9.3g}  "
            + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    if any(b["goodput"]["lower_bound"] for s in systems for b in s["by_scale"]):
        rows.append(">=: every swept rate met the target, so goodput is at least the highest rate (sweep higher)")
    if any(q is None for r in ratios for q in r["by_scale"]):
        rows.append("-: no ratio (the first system's goodput is 0, or both goodputs are lower bounds)")
    return "\n".join(rows)


def format_table(result: dict) -> str:
    """The terminal table of a result: one row per rate point, latencies in milliseconds."""
    head = (
        f"{'rate':>8} {'rate/GPU':>9} {'attain':>7} {'TTFT p50':>9} {'p90':>8} {'p99':>8} "
        f"{'TPOT p50':>9} {'p90':>8} {'p99':>8} {'req/s':>7} {'tok/s':>8} {'failed':>6} {'clipped':>7}"
    )
    rows = [head]
    for p in result["points"]:
        ms = [_ms(p[m][f"p{q}"]) for m in ("ttft", "tpot") for q in PERCENTILES]
        tput = p["throughput"]
        rows.append(
            f"{p['rate']:>8.3g} {p['per_gpu_rate']:>9.3g} {p['attainment']:>7.1%} {ms[0]:>9} {ms[1]:>8} {ms[2]:>8} "
            f"{ms[3]:>9} {ms[4]:>8} {ms[5]:>8} {_num(tput['requests_per_s']):>7} "
            f"{_num(tput['output_tokens_per_s'], '.0f'):>8} {p['num_requests'] - p['num_ok']:>6} {p['num_clipped']:>7}"
        )
    g = result["goodput"]
    bound = ">= " if g["lower_bound"] else ""
    rows.append(
        f"goodput at {result['target_attainment']:.0%} attainment (TTFT <= {result['slo']['ttft_s']:g}s, "
        f"TPOT <= {result['slo']['tpot_s']:g}s): {bound}{g['rate']:.3g} req/s = {bound}{g['per_gpu']:.3g} req/s/GPU "
        f"({result['gpus']} GPU{'s' if result['gpus'] != 1 else ''})"
    )
    if result.get("skipped_rates"):
        last = result["points"][-1]
        rows.append(
            f"attainment {last['attainment']:.1%} at {last['rate']:g} req/s is below --stop_below: "
            f"skipped rates {', '.join(f'{r:g}' for r in result['skipped_rates'])}"
        )
    return "\n".join(rows)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)
