"""KV pulled between two processes over ``jax.experimental.transfer`` (``transfer.remote``):
the path a decode process takes to a prefill process's prefix, measured on its own.

    python -m jdisagg.bench.remote_kv --tokens 512,2048 --json_out remote_kv.json

A child process stands for a prefill instance: it holds one Llama-3-8B-shaped prefix
[L, T, K, H] (k and v, bf16) per length and cuts and offers it on request (``remote.stage``).
This process stands for a decode instance on one device: it pulls each prefix through
``remote.Remote`` (stage, pull, assemble) and inserts it into a page pool, as the decode
worker does. Both share the host's first accelerator when there is one (each takes
``--mem_fraction`` of its memory). Reports per length and transfer-server setting: the
pull's wall time and GB/s, and the decode thread's time per prefix (pull + insert dispatch;
the number BENCHMARKS.md compares with the in-process server's 7.7 ms). The control channel
here is a pipe; in serving it is the instance's Stage call.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time

from absl import app, flags

_TOKENS = flags.DEFINE_list("tokens", ["512", "2048"], "Prefix lengths (T) to move.")
_SETTINGS = flags.DEFINE_list(
    "settings", ["8x16x8", "16x32x4", "1x8x256"], "Transfer-server settings: addresses x copies x MiB per chunk."
)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed pulls per case (after one untimed).")
_LAYERS = flags.DEFINE_integer("layers", 32, "L (Llama-3-8B: 32 layers, 8 KV heads of 128).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "K.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "H.")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", 0.4, "Device memory each process takes.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here.")


def _setting(text: str) -> tuple[int, int, int]:
    addresses, copies, mib = (int(x) for x in text.split("x"))
    return addresses, copies, mib * 2**20


def _prefill_side(conn, shapes, setting) -> None:
    """The child: a transfer server and one prefix per shape; stages on request."""
    import jax
    import jax.numpy as jnp

    from jdisagg.transfer import remote

    addresses, copies, chunk = setting
    server = remote.TransferServer(addresses=addresses, parallel_copies=copies, transfer_size=chunk)
    device = jax.local_devices()[0]
    prefixes = {}
    for i, shape in enumerate(shapes):
        key = jax.random.key(i)
        k = jax.device_put(jax.random.normal(key, shape, jnp.bfloat16), device)
        prefixes[shape] = (k, k + 1)
    jax.block_until_ready(prefixes)
    conn.send(server.address)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        uuid, shape, parts = msg
        k, v = prefixes[shape]
        conn.send(remote.stage(server, uuid, k, v, parts, timeout_s=30.0))
    server.close()


def main(argv: list[str]) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(_MEM_FRACTION.value))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jdisagg.runtime.decode import insert_prefix
    from jdisagg.transfer import remote

    shapes = [(_LAYERS.value, int(t), _KV_HEADS.value, _HEAD_DIM.value) for t in _TOKENS.value]
    device = jax.local_devices()[0]
    dst = NamedSharding(Mesh(np.array([device]), ("tp",)), PartitionSpec())
    page = 16
    pool_pages = sum(s[1] for s in shapes) // page + 1
    pool_shape = (_LAYERS.value, pool_pages, page, _KV_HEADS.value, _HEAD_DIM.value)
    k_pages = jax.device_put(jnp.zeros(pool_shape, jnp.bfloat16), device)
    v_pages = jax.device_put(jnp.zeros(pool_shape, jnp.bfloat16), device)
    insert = jax.jit(insert_prefix, donate_argnums=(0, 1))
    results = []
    ctx = mp.get_context("spawn")
    uuids = iter(range(1 << 40, 1 << 50, 256))
    for text in _SETTINGS.value:
        setting = _setting(text)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_prefill_side, args=(child, shapes, setting), daemon=True)
        proc.start()
        address = parent.recv()
        addresses, copies, chunk = setting
        server = remote.TransferServer(addresses=addresses, parallel_copies=copies, transfer_size=chunk)

        def stage(p, parts, conn=parent):
            conn.send((p.uuid, p.shape, parts))
            return conn.recv()

        puller = remote.Remote(server, stage, timeout_s=30.0)
        for shape in shapes:
            nbytes = 2 * int(np.prod(shape)) * 2
            walls, threads = [], []
            for i in range(_REPEATS.value + 1):
                p = remote.RemotePrefix(0, None, shape[1], shape[1], nbytes, shape, "bfloat16", address, next(uuids))
                wall, cpu = time.perf_counter(), time.thread_time()
                [(k, v)] = puller.pull([p], dst)
                pulled = time.perf_counter()
                ids = np.arange(1, shape[1] // page + 1, dtype=np.int32)
                k_pages, v_pages = insert(k_pages, v_pages, k, v, ids)
                host = time.perf_counter() - wall, time.thread_time() - cpu
                jax.block_until_ready(k_pages)
                if i:  # the first compiles the cuts and the insert
                    walls.append(pulled - wall)
                    threads.append(host)
            pull_s = statistics.median(walls)
            row = {
                "setting": text,
                "tokens": shape[1],
                "bytes": nbytes,
                "pull_ms_median": 1e3 * pull_s,
                "pull_ms_min": 1e3 * min(walls),
                "gb_s": nbytes / pull_s / 1e9,
                "decode_thread_ms_median": 1e3 * statistics.median(h for h, _ in threads),
                "decode_thread_cpu_ms_median": 1e3 * statistics.median(c for _, c in threads),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        parent.send(None)
        proc.join(30)
        server.close()
    out = {"device": str(device.device_kind), "jax": jax.__version__, "results": results}
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(out, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
