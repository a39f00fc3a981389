#!/usr/bin/env bash
# On a TPU VM with 8 chips on one host (v5e-8 or v6e-8), from a checkout: install jdisagg with
# JAX for TPUs, run the demo (default model, prefill on chip 0, decode on chip 1), then serve
# the Llama-3-8B shape with random weights on the 8-chip preset (prefill tp=4 on chips 0-3,
# decode pp=2 x tp=2 on chips 4-7) and sweep the chat workload against it.
#
#   launch/tpu_vm.sh [v5e|v6e] [OUT]
#
# The VM: `gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type ACC
# --version RUNTIME`, ACC v5litepod-8 (v5e) or v6e-8 (v6e), RUNTIME the TPU software version
# the Cloud TPU docs give for that generation; then `gcloud compute tpus tpu-vm ssh NAME
# --zone ZONE`. JAX sees one device per chip on v5e and v6e, so 8; a v4-8 or v5p-8 VM shows 4
# (two cores per chip) and the presets' device check refuses it with the count.
#
# Not yet run on a TPU. Checked on CPU only: the presets against Llama-3-8B on these chips'
# memory (tests/test_tpu_presets.py) and the TPU kernels in Pallas' TPU interpreter
# (tests/test_tpu_kernels.py); these presets' instances span chips, so they attend with XLA's
# einsums and the gather path, not the kernels (README, "TPUs").
set -euo pipefail
gen=${1:-v5e} out=${2:-tpu-results}
case $gen in v5e | v6e) ;; *) echo "usage: $0 [v5e|v6e] [OUT]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
# One resolve for both, so installing jdisagg cannot swap the TPU build of jax for another.
pip install -U -e ".[bench]" "jax[tpu]"
python -c 'import jax; d = jax.devices(); print(len(d), "x", d[0].device_kind); assert d[0].platform == "tpu"'
python -m jdisagg.demo --mesh 1p1d
mkdir -p "$out"
# One process at a time owns the chips: the server takes them all, the load generator (a
# gRPC client) must not start a TPU backend of its own.
python -m jdisagg.serve --model llama3-8b --mesh "tpu-$gen-8" --port 50051 >"$out/serve.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
# bench run waits until the server reports SERVING (weights placed, every program compiled).
JAX_PLATFORMS=cpu python -m jdisagg.bench run --target 127.0.0.1:50051 --workload chat --rates 2,4,8,16 \
  --duration_s 30 --slo_ttft 0.25 --slo_tpot 0.1 --stop_below 0.5 --out "$out/chat.json" --plots_dir "$out"
