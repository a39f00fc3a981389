"""Benchmarks: the goodput load generator (``python -m jdisagg.bench run|plot|slo``) and the
micro-benchmarks (``python -m jdisagg.bench micro``).

* ``workloads`` — length distributions (code = HumanEval, chat, summarize, fixed, trace),
  arrival processes (Poisson / gamma with a coefficient of variation) and the requests.
* ``loadgen`` — sends a rate sweep over gRPC with ``AsyncClient`` and records every token's
  arrival time and the server's latency breakdown.
* ``stats`` — TTFT, TPOT, ITL, E2E, SLO attainment and goodput as pure functions, and
  goodput rescored at tighter or looser SLOs from the stored per-request records.
* ``plots`` — attainment vs per-GPU rate (DistServe figure 8), latency CDFs, and goodput
  vs SLO scale.
"""
