"""Host CPU time per streamed token of one serving process, with the device taken out.

The server runs the counting fake runners of tests/fakes.py (device calls return at once),
so what it spends is the serving path alone: scheduler verbs, the text path, the listener
hand-off and gRPC. A client in a second process streams 64 requests of 200 tokens.

    python launch/host_cost.py [--text]    # --text: with a tokenizer (the text path runs)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PRESET = """page_size = 16
max_seq_len = 256
[[prefill]]
devices = [0]
max_batch = 8
token_budget = 256
[[decode]]
devices = [1]
max_batch = 64
pages = 2000
"""

CLIENT = """
import asyncio, sys
from jdisagg.serving.client import AsyncClient

async def main(port):
    async with AsyncClient(f"127.0.0.1:{port}") as c:
        async def one():
            n = 0
            async for m in c.generate([65] * 10, max_tokens=200, ignore_eos=True):
                n += len(m.token_ids)
            return n
        await one()
        return sum(await asyncio.gather(*[one() for _ in range(64)]))

print(asyncio.run(main(int(sys.argv[1]))))
"""


def main() -> None:
    import fakes

    from jdisagg.serving.server import Server

    engine = fakes.fake_engine(PRESET, tokenizer=fakes.ByteTokenizer() if "--text" in sys.argv else None)
    server = Server(engine, port=0, max_queue=1000)
    server.start()
    server.set_ready()
    cpu, wall = time.process_time(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CLIENT, str(server.port)], capture_output=True, text=True, check=True)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server.stop()
    tokens = int(out.stdout.split()[-1]) + 200  # the warm-up request too
    steps = len(engine.decode[0].runner.calls)
    print(f"{tokens} tokens in {wall:.2f} s, {steps} decode steps: server CPU {cpu / tokens * 1e6:.1f} us per token")


if __name__ == "__main__":
    main()
