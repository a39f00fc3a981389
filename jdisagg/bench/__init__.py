"""Benchmarks: the goodput load generator (``python -m jdisagg.bench run|plot``) and the
micro-benchmarks (``python -m jdisagg.bench micro``).

* ``workloads`` — length distributions (code = HumanEval, chat, summarize, fixed, trace),
  arrival processes (Poisson / gamma with a coefficient of variation) and the requests.
* ``loadgen`` — sends a rate sweep over gRPC with ``AsyncClient`` and records every token's
  arrival time and the server's latency breakdown.
* ``stats`` — TTFT, TPOT, ITL, E2E, SLO attainment and goodput as pure functions.
* ``plots`` — attainment vs per-GPU rate (DistServe figure 8) and latency CDFs.
"""
