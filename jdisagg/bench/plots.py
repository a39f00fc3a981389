"""PNG plots of benchmark results (matplotlib, Agg; no display needed).

* ``attainment_plot``: SLO attainment against per-GPU request rate, one line per result file
  (system), like figure 8 of the DistServe paper, with the target attainment as a dotted
  line and each system's per-GPU goodput as a dashed vertical line.
* ``latency_cdf_plot``: the CDFs of TTFT and TPOT for one result, one curve per rate, with
  the SLOs as dotted lines, on a log time axis. The curves count failed requests in the
  denominator, so a point with failures never reaches 1.
* ``slo_scale_plot``: per-GPU goodput against SLO scale (both SLOs times k), one line per
  system, from ``stats.slo_scale_table``, like DistServe's SLO-scale figures; a goodput that is
  only a lower bound (every swept rate met the target) is drawn as an upward triangle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _figure(width: float, height: float, cols: int = 1):
    from matplotlib.figure import Figure  # renders with Agg; never touches pyplot's global state

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def attainment_plot(results: Sequence[dict], out: str | Path) -> Path:
    """Attainment (%) vs per-GPU rate for each result (labelled by its "label"); writes ``out``."""
    fig, (ax,) = _figure(6.4, 4.2)
    for i, result in enumerate(results):
        color = f"C{i % 10}"
        x = [p["per_gpu_rate"] for p in result["points"]]
        y = [100 * p["attainment"] for p in result["points"]]
        good = result["goodput"]["per_gpu"]
        bound = ">= " if result["goodput"]["lower_bound"] else ""
        label = f"{result.get('label') or f'system {i + 1}'} (goodput {bound}{good:.3g}/GPU)"
        ax.plot(x, y, "o-", color=color, label=label)
        if good > 0:
            ax.axvline(good, color=color, linestyle="--", linewidth=0.8)
    targets = {r["target_attainment"] for r in results}
    for t in targets:
        ax.axhline(100 * t, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("rate (requests/s per GPU)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(left=0)
    ax.set_title(_title(results))
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def latency_cdf_plot(result: dict, out: str | Path) -> Path:
    """TTFT and TPOT CDFs of one result, one curve per rate point; writes ``out``."""
    fig, axes = _figure(11, 4.2, cols=2)
    for ax, metric, slo in zip(axes, ("ttft", "tpot"), (result["slo"]["ttft_s"], result["slo"]["tpot_s"]), strict=True):
        for i, point in enumerate(result["points"]):
            reqs = point["requests"]
            values = sorted(r[metric] for r in reqs if not r["error"] and r[metric] is not None)
            total = len(values) + sum(1 for r in reqs if r["error"])
            if not values:
                continue
            y = [(k + 1) / total for k in range(len(values))]
            ax.step(values, y, where="post", color=f"C{i % 10}", label=f"{point['rate']:.3g} req/s")
        ax.axvline(slo, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")  # milliseconds of data and a seconds-scale SLO on one axis
        ax.set_xlabel(f"{metric.upper()} (s, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{metric.upper()} (SLO {slo:g} s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(_title([result]))
    return _save(fig, out)


def slo_scale_plot(table: dict, out: str | Path) -> Path:
    """Per-GPU goodput vs SLO scale for each system of ``stats.slo_scale_table``; writes ``out``."""
    fig, (ax,) = _figure(6.4, 4.2)
    scales = table["scales"]
    for i, system in enumerate(table["systems"]):
        color = f"C{i % 10}"
        goods = [s["goodput"] for s in system["by_scale"]]
        ax.plot(scales, [g["per_gpu"] for g in goods], "-", color=color, label=system["label"])
        for marker, lower_bound in (("o", False), ("^", True)):
            points = [(k, g["per_gpu"]) for k, g in zip(scales, goods, strict=True) if g["lower_bound"] == lower_bound]
            if points:
                ax.plot(*zip(*points, strict=True), marker, color=color)
    if any(s["goodput"]["lower_bound"] for system in table["systems"] for s in system["by_scale"]):
        ax.plot([], [], "^", color="gray", label="lower bound (all swept rates met the target)")
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    slo = table["slo"]
    ax.set_xlabel(f"SLO scale k (TTFT <= k * {slo['ttft_s']:g} s, TPOT <= k * {slo['tpot_s']:g} s)")
    ax.set_ylabel(f"goodput at {table['target_attainment']:.0%} (requests/s per GPU)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{table['workload']}: goodput vs SLO scale")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def run_plots(result: dict, plots_dir: str | Path) -> list[Path]:
    """The plots of one run: ``attainment.png`` and ``latency_cdf.png`` in ``plots_dir``."""
    d = Path(plots_dir)
    d.mkdir(parents=True, exist_ok=True)
    return [attainment_plot([result], d / "attainment.png"), latency_cdf_plot(result, d / "latency_cdf.png")]


def _title(results: Sequence[dict]) -> str:
    parts = sorted(
        {f"{r['workload']}, TTFT <= {r['slo']['ttft_s']:g} s, TPOT <= {r['slo']['tpot_s']:g} s" for r in results}
    )
    return "; ".join(parts)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
