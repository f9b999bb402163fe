#!/usr/bin/env bash
# The original project's entry point, kept: ./run_training.sh MODE MODEL_TYPE [CONFIG] [key=value ...]
#   MODE:       quick (1000 steps; 200 on a machine without a GPU), scratch, transfer, custom
#   MODEL_TYPE: standard, mod, dtf
#   CONFIG:     for custom: a spec file, or the name of one in experiments/ (without .yaml)
# Further key=value arguments override the spec; --out DIR, --resume, --force and --no-ray pass through.
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
MODE="$1"; TYPE="$2"; shift 2
case "$TYPE" in standard|mod|dtf) ;; *) echo "run_training.sh: MODEL_TYPE '$TYPE': expected standard, mod or dtf" >&2; exit 2;; esac
source scripts/bootstrap.sh
case "$MODE" in
  quick)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then STEPS=1000; else STEPS=200; fi
    exec dtlab train experiments/quick.yaml "model.type=$TYPE" "training.max_steps=$STEPS" "$@" ;;
  scratch|transfer)
    exec dtlab train "experiments/${TYPE}_${MODE}.yaml" "$@" ;;
  custom)
    [ $# -ge 1 ] || { echo "run_training.sh: custom needs CONFIG (a spec file or a name in experiments/)" >&2; exit 2; }
    CONFIG="$1"; shift
    [ -f "$CONFIG" ] || CONFIG="experiments/${CONFIG%.yaml}.yaml"
    exec dtlab train "$CONFIG" "model.type=$TYPE" "$@" ;;
  *) echo "run_training.sh: MODE '$MODE': expected quick, scratch, transfer or custom" >&2; exit 2 ;;
esac
