#!/usr/bin/env bash
# A TPU VM slice (e.g. v5e-16: 4 hosts x 4 chips) as ONE decode instance: one multi-controller
# JAX program, one process per host, behind a router and prefill instances that run elsewhere
# (another TPU VM, say a v5e-8 with `launch/one_host.sh`-style prefill processes). Run it on
# every host of the slice at once:
#
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command="cd jdisagg && launch/tpu_slice.sh PRESET MODEL INDEX ROUTER HOSTS"
#
# PRESET's [[decode]] table INDEX lists the slice's global device indices (jax.devices()
# across all hosts, in JAX's order), with pp x tp over them (pp across hosts keeps the
# cross-host traffic to one activation hand-over per stage). ROUTER is the router's control
# address (host:port, its --control_port); HOSTS the slice's host count. With
# --coordinator auto JAX finds the slice's processes itself; process 0 (worker 0) joins the
# router and serves the control plane, the others follow it. Each host pulls its own shards'
# KV from the prefill processes' transfer servers, so every slice host must reach every
# prefill host on the ports those pick (and the router must reach worker 0's control port).
#
# Not yet run on a TPU: the multi-host decode instance is tested on CPU with two processes
# (tests/test_multiprocess_multihost.py).
set -euo pipefail
preset=${1:?preset} model=${2:?model} index=${3:?decode index} router=${4:?router host:port} hosts=${5:?hosts}
cd "$(dirname "$0")/.."
me=$(hostname -I | awk '{print $1}')
exec python -m jdisagg.serve --role decode --index "$index" --mesh "$preset" --model "$model" \
  --host 0.0.0.0 --advertise_host "$me" --port 50061 --metrics_port 9092 --router "$router" \
  --coordinator auto --num_processes "$hosts"
