"""Recording the workload a server sees, for replanning (``python -m jdisagg.plan search --trace``).

A ``TraceRecorder`` appends one JSON line per finished request, in the trace format that
``jdisagg.bench.workloads.read_trace`` reads and ``jdisagg.bench run --workload trace``
replays: ``{"timestamp": seconds since the recorder started, "input_len": prompt tokens,
"output_len": tokens generated}``. No text is kept. The server calls ``record(request)``
when a request ends; requests that were cancelled or failed are not written (their output
length is not what they asked for). Lines come in finishing order; the reader sorts them by
timestamp. Thread-safe; each line is flushed as it is written.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jdisagg.sched.request import Request

RECORDED = ("stop", "length")  # finish reasons whose output length is the request's own


class TraceRecorder:
    """Appends finished requests to a JSONL trace at ``path``.

    ``clock`` must be the scheduler's (``Request.arrival`` is on it); the recorder's start on
    that clock is timestamp 0.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.perf_counter):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.start = clock()
        self.written = 0
        self.skipped = 0

    def record(self, request: Request) -> None:
        """Writes ``request`` (finished) as one trace line; skips cancelled and failed ones."""
        if request.finish_reason not in RECORDED or request.arrival is None:
            with self._lock:
                self.skipped += 1
            return
        line = {
            "timestamp": round(max(0.0, request.arrival - self.start), 6),
            "input_len": len(request.prompt),
            "output_len": len(request.output),
        }
        with self._lock:
            if self._file.closed:
                return
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
            self.written += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
