"""The serving face: the gRPC servicer, the worker threads that drive the instances, the
client library and Prometheus metrics.

May import everything below it (``runtime``, ``sched``, ``text``, ``proto``).
"""
