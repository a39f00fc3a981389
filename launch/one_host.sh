#!/usr/bin/env bash
# A whole mesh preset as processes on this host: a router on PORT and one process per prefill
# and decode instance, each with its own JAX runtime and devices (README "Instances as processes").
#
#   launch/one_host.sh MESH MODEL [PORT] [extra jdisagg.serve flags...]
#   launch/one_host.sh cpu-2p2d tiny-llama 50051
#   launch/one_host.sh gpu-4 llama3-8b 50051 --http_port 8000
#
# On a GPU host every process sees only its instance's GPUs (CUDA_VISIBLE_DEVICES), so the
# processes do not claim each other's memory; on CPU each has its own simulated devices.
# Instances join the router on PORT + 1; metrics on PORT + 2 (router) and up, in preset order.
# Ctrl-C or SIGTERM drains the router, then the instances.
set -euo pipefail
mesh=${1:?usage: one_host.sh MESH MODEL [PORT] [flags...]} model=${2:?model} port=${3:-50051}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
visible=()
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  visible=(--visible_devices_env CUDA_VISIBLE_DEVICES)
fi
exec python -m jdisagg.serve --role local --mesh "$mesh" --model "$model" --port "$port" \
  --control_port $((port + 1)) --metrics_port $((port + 2)) "${visible[@]}" "$@"
