"""The scheduling core: plain Python that never imports jax.

Requests and their states, the FCFS prefill queue with token-budget batching, each prefill
instance's buffer of prefixes waiting to be pulled (back-pressure), each decode instance's
slots and page allocator (preemption), cancellation, failure and least-loaded routing. The
in-process server, the planner's simulator and (later) one process per instance drive the
same objects; time comes from an injected clock.

May import only the standard library and ``jdisagg.sched`` itself.
"""
