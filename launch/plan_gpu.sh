#!/usr/bin/env bash
# The planner's one-GPU run (BENCHMARKS.md, "Planner"): profile a model on this GPU, predict
# the goodput of one preset on the chat and code workloads at the paper's SLOs, then measure
# it with jdisagg.bench at rates around the prediction (0.85x, 1x, 1.15x), then profile a
# second model. Everything lands in OUT; a short table ends the output.
#
#   launch/plan_gpu.sh OUT [HUMANEVAL_LENGTHS]
#   MODEL=llama3-8b SECOND=opt-13b MESH=gpu-1 DEADLINE_S=540 launch/plan_gpu.sh /tmp/plan
#
# Then: python -m jdisagg.plan calibrate --profile OUT/MODEL.DEVICE.json --result OUT/MODEL.MESH.code.json.gz
# --mesh MESH (the host's cost per streamed token), and simulate again (BENCHMARKS.md, "Planner").
# Environment: MODEL (profiled, predicted and measured; llama3-8b), SECOND (profiled only;
# opt-13b, on the quick grid; empty: none), MESH (gpu-1), DEADLINE_S (seconds the whole run may take; the second
# profile gets what is left), SECONDS_PER_RATE (12) and WARMUP_S (6) per bench point.
set -uo pipefail
out=$1 he=${2:-.bench_data/plan/HumanEval.lengths.json}
model=${MODEL:-llama3-8b} second=${SECOND-opt-13b} mesh=${MESH:-gpu-1} deadline=${DEADLINE_S:-540}
mkdir -p "$out"
t0=$(date +%s)
stamp() { echo "== $(($(date +%s) - t0))s: $*"; }
left() { echo $((deadline - ($(date +%s) - t0))); }
export PYTHONUNBUFFERED=1
tag=$(python3 -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '-').lower())")

stamp "profile $model on $tag"
timeout 200 python3 -m jdisagg.plan profile --model "$model" --mesh "$mesh" --out "$out/$model.$tag.json" --noprogress

stamp "predict $mesh"
slo_chat=(--slo_ttft 0.25 --slo_tpot 0.1) slo_code=(--slo_ttft 0.125 --slo_tpot 0.2)
timeout 60 python3 -m jdisagg.plan simulate --profile "$out/$model.$tag.json" --mesh "$mesh" --workload chat \
  "${slo_chat[@]}" --json_out "$out/predicted.$model.$mesh.chat.json"
timeout 60 python3 -m jdisagg.plan simulate --profile "$out/$model.$tag.json" --mesh "$mesh" --workload code \
  --humaneval_path "$he" "${slo_code[@]}" --json_out "$out/predicted.$model.$mesh.code.json"
rates() {
  python3 -c "import json, sys; g = json.load(open(sys.argv[1]))['results'][0]['goodput']['rate'] or 1
print(','.join(f'{g * k:.3g}' for k in (0.85, 1.0, 1.15)))" "$1"
}
chat=$(rates "$out/predicted.$model.$mesh.chat.json") code=$(rates "$out/predicted.$model.$mesh.code.json")

stamp "measure $mesh: chat at $chat, code at $code req/s"
WARMUP_S=${WARMUP_S:-6} timeout $(($(left) - 60)) launch/gpu_experiment.sh /tmp/plan_exp "$model" "$mesh" \
  "chat:$chat code:$code" "${SECONDS_PER_RATE:-12}" "$he"
cp /tmp/plan_exp/"$model.$mesh".*.json.gz "$out/" 2>/dev/null  # bench results are gzipped
tail -5 /tmp/plan_exp/"$model.$mesh".serve.log > "$out/serve.tail.log" 2>/dev/null

if [[ -n $second && $(left) -gt 60 ]]; then
  stamp "profile $second ($(left)s left)"
  timeout $(($(left) - 5)) python3 -m jdisagg.plan profile --model "$second" --mesh "$mesh" --quick --repeats 2 \
    --out "$out/$second.$tag.json" --noprogress
fi

stamp "done"
python3 - "$out" "$model" "$mesh" <<'EOF'
import gzip, json, sys
from pathlib import Path
out, model, mesh = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"{'workload':>8} {'predicted':>10} {'measured':>10} {'ratio':>6}   (req/s/GPU, {model}, {mesh})")
for w in ("chat", "code"):
    try:
        p = json.loads((out / f"predicted.{model}.{mesh}.{w}.json").read_text())["results"][0]["goodput"]
        m = json.loads(gzip.decompress((out / f"{model}.{mesh}.{w}.json.gz").read_bytes()))["goodput"]
    except (OSError, KeyError, ValueError) as e:
        print(f"{w:>8} missing: {e}")
        continue
    bound = ">=" if m["lower_bound"] else ""
    print(f"{w:>8} {p['per_gpu']:>10.3g} {bound + format(m['per_gpu'], '.3g'):>10} {p['per_gpu'] / max(m['per_gpu'], 1e-9):>6.2f}")
EOF
