"""The serving face: the gRPC servicer and the OpenAI-compatible HTTP API over one intake,
the worker threads that drive the instances, access control (API key, TLS), the client
library and Prometheus metrics.

May import everything below it (``runtime``, ``sched``, ``text``, ``proto``).
"""
