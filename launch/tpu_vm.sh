#!/usr/bin/env bash
# On a TPU VM with 8 chips (v5e-8 or v6e-8), from a checkout: install JAX for TPUs and
# jdisagg, run the demo (default model, prefill on chip 0, decode on chip 1), then serve the
# Llama-3-8B shape with random weights on the 8-chip preset (prefill tp=4, decode pp=2 x tp=2)
# and sweep the chat workload against it.
#
#   launch/tpu_vm.sh [v5e|v6e] [OUT]
#
# Not yet run on a TPU: the TPU presets are checked against the model shapes on CPU only.
set -euo pipefail
gen=${1:-v5e} out=${2:-tpu-results}
cd "$(dirname "$0")/.."
pip install -U "jax[tpu]"
pip install -e ".[bench]"
python -m jdisagg.demo --mesh 1p1d
mkdir -p "$out"
python -m jdisagg.serve --model llama3-8b --mesh "tpu-$gen-8" --port 50051 >"$out/serve.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
python -m jdisagg.bench run --target 127.0.0.1:50051 --workload chat --rates 2,4,8,16 --duration_s 30 \
  --slo_ttft 0.25 --slo_tpot 0.1 --stop_below 0.5 --out "$out/chat.json" --plots_dir "$out"
