#!/usr/bin/env bash
# Two processes sharing one GPU (memory fraction split): KV pulled across processes.
#
#     launch/h200_two_processes.sh OUT_DIR
#
# 1. ``python -m jdisagg.bench.remote_kv``: Llama-3-8B-shaped prefixes (512 and 2048 tokens)
#    pulled from a second process through transfer.remote, for three transfer-server
#    settings: GB/s and the decode thread's time per prefix.
# 2. A router, a prefill and a decode process of the Llama-3-8B shape (random weights) on
#    the one GPU (each process: --devices 0, 42% of the memory), 48 requests of 1,000-token
#    prompts, 16 concurrent; the decode process's metrics give the pull time, the bytes and
#    the decode worker's time per pulled prefix.
# Results go to OUT_DIR (remote_kv.json, system.json, logs). Needs the jdisagg sources on
# PYTHONPATH (and grpcio-health-checking / grpcio-reflection where they are missing).
# OVERLAP=false makes the decode worker wait for each pull; ROUNDS repeats the 48 requests.
# MODEL and KV_ARGS override the model and the micro-benchmark's flags (KV_ARGS=skip: none; a CPU dry run:
# MODEL=tiny-llama ATTENTION=dot KV_ARGS="--layers 4 --tokens 64 --repeats 2 --settings 8x16x8").
set -uo pipefail
out="${1:?usage: h200_two_processes.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

kv_args=${KV_ARGS:---tokens 512,2048 --settings 8x16x8,16x32x4,1x8x256 --repeats 8}
if [[ $kv_args != skip ]]; then
  # shellcheck disable=SC2086
  timeout 150 python3 -m jdisagg.bench.remote_kv $kv_args --json_out "$out/remote_kv.json" 2> "$out/remote_kv.log"
fi

cat > /tmp/h200-2proc.toml <<'EOF'
# One prefill and one decode instance, each process on the host's GPU 0 (--devices 0).
name = "h200-2proc"
page_size = 16
max_seq_len = 1024
length_buckets = [1024]
decode_attention = "ATTENTION"

[[prefill]]
devices = [0]
max_batch = 1
token_budget = 1024

[[decode]]
devices = [1]
max_batch = 16
batch_buckets = [16]
pages = 2048
EOF
sed -i "s/ATTENTION/${ATTENTION:-pallas}/" /tmp/h200-2proc.toml
common=(--model "${MODEL:-llama3-8b}" --mesh /tmp/h200-2proc.toml --drain_timeout 5)
JAX_PLATFORMS=cpu python3 -m jdisagg.serve --role router "${common[@]}" --port 50051 --control_port 50052 \
  --metrics_port 9100 > "$out/router.out" 2> "$out/router.log" &
pids=($!)
for role in prefill decode; do
  port=$([[ $role == prefill ]] && echo 9101 || echo 9102)
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.42 python3 -m jdisagg.serve --role $role "${common[@]}" --devices 0 \
    --port 0 --router 127.0.0.1:50052 --metrics_port $port --overlap_pulls="${OVERLAP:-true}" \
    > "$out/$role.out" 2> "$out/$role.log" &
  pids+=($!)
done

timeout 200 python3 - "$out" "${ROUNDS:-1}" <<'EOF'
import asyncio, json, sys, time, urllib.request
import numpy as np
from jdisagg.serving.client import AsyncClient

out = sys.argv[1]

def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and l[0] != "#"}

async def main():
    start = time.monotonic()
    async with AsyncClient("127.0.0.1:50051", timeout=120) as c:
        while True:
            try:
                if await c.health() == "SERVING":
                    break
            except Exception:
                pass
            if time.monotonic() - start > 170:
                raise SystemExit("not serving in time")
            await asyncio.sleep(1)
        ready = time.monotonic() - start
        vocab = (await c.model_info()).vocab_size
        rng = np.random.default_rng(0)
        sem = asyncio.Semaphore(16)
        async def one(i):
            async with sem:
                info_vocab = vocab
                return await c.complete(rng.integers(3, info_vocab, 1000).tolist(), max_tokens=16, ignore_eos=True)
        await asyncio.gather(*(one(i) for i in range(4)))  # warm
        rounds = []
        for _ in range(int(sys.argv[2])):
            before = scrape(9102)
            t0 = time.monotonic()
            done = await asyncio.gather(*(one(i) for i in range(48)))
            rounds.append(summary(ready, done, time.monotonic() - t0, before, scrape(9102)))
            print(json.dumps(rounds[-1]), flush=True)
    json.dump(rounds, open(f"{out}/system.json", "w"), indent=1)

def summary(ready, done, wall, before, after):
    d = {k: after[k] - before.get(k, 0) for k in after if k.endswith(("_sum", "_count", "_total"))}
    lat = [r.final.latency for r in done]
    return {
        "ready_s": ready, "requests": len(done), "wall_s": wall,
        "pull_host_ms_mean": 1e3 * d["jdisagg_kv_pull_host_seconds_sum"] / d["jdisagg_kv_pull_host_seconds_count"],
        "pull_batch_ms_mean": 1e3 * d["jdisagg_kv_transfer_seconds_sum"] / d["jdisagg_kv_transfer_seconds_count"],
        "pull_batches": d["jdisagg_kv_transfer_seconds_count"],
        "bytes_per_request": d["jdisagg_kv_transfer_bytes_total"] / len(done),
        "transfer_ms_mean_client": 1e3 * float(np.mean([l.transfer_s for l in lat])),
        "ttft_ms_mean": 1e3 * float(np.mean([l.ttft_s for l in lat])),
        "tpot_ms_mean": 1e3 * float(np.mean([l.tpot_s for l in lat])),
        "failures": d.get("jdisagg_kv_transfer_failures_total", 0),
    }

asyncio.run(main())
EOF
kill "${pids[@]}" 2> /dev/null
wait
