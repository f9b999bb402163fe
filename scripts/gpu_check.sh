#!/usr/bin/env bash
# The project's one-call GPU check (no Ray needed; under 8 minutes on one H200):
#   1. the `gpu`-marked tests (bf16 training without host syncs, CUDA = CPU, cached decoding, and
#      which SDPA kernels padded/routed attention ran with the math kernel disabled);
#   2. the training bench at the 0.5B shape, eager and compiled;
#   3. a short compiled training run of the loop (the quick experiment's data, no Ray);
#   4. the decode bench (prefill and per-token decode at batch 1 and 8, Standard as baseline);
#   5. the memory plan against torch.cuda.max_memory_allocated at 0.5B (memory.json: the ratios).
# Everything goes into one folder: scripts/gpu_check.sh [OUT_DIR] (default $OUT, else gpu-check-DATE).
# Each step has its own time limit (520 s together) and its exit status is recorded; the script goes on
# after a failure. `dtlab report OUT_DIR` shows the short run with the bench-*.json files beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

# dtlab importable without installing: a namespace folder of links to the top-level packages
if ! python -c "import dtlab.models" 2>/dev/null; then
  NS="$(mktemp -d)/ns"; mkdir -p "$NS/dtlab"
  for pkg in models trainers analysis dashboards; do ln -s "$PWD/$pkg" "$NS/dtlab/$pkg"; done
  export PYTHONPATH="$NS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export DTLAB_GPU_OUT="$OUT_DIR" DTLAB_CACHE="$OUT_DIR/cache" TOKENIZERS_PARALLELISM=false
STATUS="$OUT_DIR/status.txt"; : > "$STATUS"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to NAME.log, record status and time
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$STATUS"
}

python - > "$OUT_DIR/env.json" <<'PY'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for mod in ("transformers", "ray", "pydantic", "yaml", "pytest", "tokenizers", "datasets"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as err:
        info[mod] = f"missing ({type(err).__name__})"
print(json.dumps(info, indent=1))
PY
cat "$OUT_DIR/env.json"

step gpu_tests 100 python -m pytest -q -m gpu tests/models/test_gpu.py -p no:cacheprovider \
  --junitxml="$OUT_DIR/gpu_tests.xml"
step bench_eager 70 python -m dtlab.trainers bench --preset 0.5B --capacities 0.125 --steps 5 --warmup 2 \
  --out "$OUT_DIR/bench-eager.json" --force
step bench_compiled 110 python -m dtlab.trainers bench --preset 0.5B --capacities 0.125 --steps 5 --warmup 2 \
  --compile --variants standard mod dtf --out "$OUT_DIR/bench-compiled.json" --force
step train_compiled 80 python -m dtlab.trainers train experiments/quick.yaml training.compile=on \
  resources.device=cuda training.max_steps=60 resources.use_ray=false --no-ray --out "$OUT_DIR/train" --force
step decode_bench 100 python -m dtlab.trainers bench --decode --preset 0.5B --steps 2 --new-tokens 64 \
  --out "$OUT_DIR/bench-decode.json" --force
step memory_plan 60 python scripts/gpu_memory_check.py "$OUT_DIR/memory.json" --batch 4 --seq-len 2048
echo "results in $OUT_DIR"
! grep -v "rc=0 " "$STATUS"
