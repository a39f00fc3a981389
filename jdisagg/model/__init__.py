"""The model as math: config and named shapes, the decoder, attention over each kind of KV
cache, the paged decode kernel, the sampler and sharding rules.

Pure jitted functions over explicit parameters; no scheduling, no I/O. ``config`` and
``axes`` import no jax (the preset reader uses them); the rest may import only jax, flax
and ``jdisagg.sched.params``.
"""
