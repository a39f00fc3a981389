"""Seconds from starting ``python -m jdisagg.serve`` to its "ready" line, cold and warm.

Cold: an empty compilation cache directory (JAX's persistent cache and the program store
beside it); warm: the same directory again, ``--warm`` times. The server is stopped (SIGINT)
at "ready" each time. Extra arguments go to the server.

    PYTHONPATH=. python launch/startup_time.py                      # the default model, preset cpu
    PYTHONPATH=. python launch/startup_time.py --warm 3 -- --model llama3-8b --mesh gpu-1
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time


def ready_seconds(cache: str, server_args: list[str]) -> tuple[float, list[str]]:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "jdisagg.serve", "--port", "0", "--metrics_port", "0", *server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if "jdisagg.serve: ready on" in line:
            seconds = time.perf_counter() - start
            break
    else:
        raise SystemExit("the server exited before it was ready:\n" + "\n".join(lines[-30:]))
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return seconds, [x for x in lines if "compiled" in x or "warmed up" in x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm", type=int, default=2, help="Warm starts after the cold one.")
    parser.add_argument("server_args", nargs="*", help="Arguments for jdisagg.serve (after --).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jdisagg-startup-") as cache:
        for i in range(1 + args.warm):
            seconds, notes = ready_seconds(cache, args.server_args)
            print(f"{'cold' if i == 0 else 'warm'}: ready in {seconds:.1f} s", flush=True)
            for note in notes:
                print("   ", note[note.find("]") + 1 :].strip() if "]" in note else note)


if __name__ == "__main__":
    main()
