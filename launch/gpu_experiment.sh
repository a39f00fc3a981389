#!/usr/bin/env bash
# The DistServe experiment on one GPU host: for each system (mesh preset) start
# `jdisagg.serve`, sweep request rates with `jdisagg.bench` for each workload against it,
# stop it, then overlay the systems' attainment curves.
#
#   launch/gpu_experiment.sh OUT MODEL "SYSTEMS" "WORKLOAD:RATES ..." [SECONDS_PER_RATE] [HUMANEVAL]
#   launch/gpu_experiment.sh /tmp/exp llama3-8b "gpu-2 gpu-2-colocated gpu-2-chunked" \
#       "chat:4,8,12,16 code:8,16,24,32" 20
#
# Environment: WARMUP_S (default 0) seconds of arrivals before each point's measured ones, not
# counted; PORT_BASE (default 50050) so two experiments can share a host, each on its own
# GPUs (CUDA_VISIBLE_DEVICES).
# Rates run lowest first; once a rate's attainment is below 50% the higher ones are skipped
# (they cannot change the goodput, and an overloaded point takes long to drain).
# SLOs are the DistServe paper's for OPT-13B: chat TTFT 0.25 s / TPOT 0.1 s, code 0.125 s / 0.2 s;
# SLO_CHAT, SLO_CODE, SLO_SUMMARIZE ("TTFT TPOT" in seconds) override them (OPT-66B: chat
# "0.4 0.1", summarize "15 0.15"; summarize defaults to "1.0 0.1").
# On a machine without network: HUMANEVAL is the HumanEval.lengths.json that a `code` run
# writes next to its cached HumanEval file, and grpcio-health-checking / grpcio-reflection
# must be installed (see BENCHMARKS.md for the exact set-up used). Results are gzipped compact
# JSON (what docs/bench keeps); the server logs stay in OUT and are not for committing.
set -euo pipefail
out=$1 model=$2 systems=$3 workloads=$4 seconds=${5:-20} humaneval=${6:-}
mkdir -p "$out"
port=${PORT_BASE:-50050}
for system in $systems; do
  port=$((port + 1))
  log="$out/$model.$system.serve.log"
  python3 -m jdisagg.serve --model "$model" --mesh "$system" --port "$port" --metrics_port 0 >"$log" 2>&1 &
  pid=$!
  start=$(date +%s)
  until grep -q "ready on" "$log"; do
    kill -0 "$pid" 2>/dev/null || { echo "== server for $system died:"; tail -20 "$log"; continue 2; }
    sleep 1
  done
  echo "== $system ready in $(( $(date +%s) - start ))s"
  for w in $workloads; do
    name=${w%%:*} rates=${w#*:}
    case $name in
      chat) read -r ttft tpot <<<"${SLO_CHAT:-0.25 0.1}" ;;
      code) read -r ttft tpot <<<"${SLO_CODE:-0.125 0.2}" ;;
      *) read -r ttft tpot <<<"${SLO_SUMMARIZE:-1.0 0.1}" ;;
    esac
    slo=(--slo_ttft "$ttft" --slo_tpot "$tpot")
    extra=()
    [[ $name == code && -n $humaneval ]] && extra=(--humaneval_path "$humaneval")
    python3 -m jdisagg.bench run --target "127.0.0.1:$port" --workload "$name" --rates "$rates" \
      --duration_s "$seconds" --warmup_s "${WARMUP_S:-0}" "${slo[@]}" "${extra[@]}" --label "$system" --noprogress --stop_below 0.5 \
      --out "$out/$model.$system.$name.json.gz" || echo "== $system $name failed (exit $?); see $log"
  done
  kill -TERM "$pid"
  wait "$pid" || true
done
for w in $workloads; do
  name=${w%%:*}
  python3 -m jdisagg.bench plot "$out"/"$model".*."$name".json.gz --out "$out/$model.$name.attainment.png" || true
done
