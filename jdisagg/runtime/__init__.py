"""Device work: the prefill and decode runners, their compiled shapes (buckets), device
memory sizing, start-up compiles, and the per-instance loops that execute what the
scheduling core decides.

May import ``jdisagg.model``, ``jdisagg.transfer``, ``jdisagg.sched`` and jax; makes no
scheduling decision of its own.
"""
