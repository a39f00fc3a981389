"""KV transfer: moving one request's prefix KV from where prefill left it into the layout a
decode instance asks for (today: device to device inside one process, ``reshard``).

May import jax and ``jdisagg.runtime.prefill`` (the prefix type); nothing above it.
"""
