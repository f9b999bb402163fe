#!/usr/bin/env bash
# Sets everything up on first use, then runs the main job: the quick experiment's DTF model on
# whatever device is there (`dtlab train experiments/quick.yaml`). Arguments replace the command.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
if [ $# -eq 0 ]; then set -- train experiments/quick.yaml; fi
exec dtlab "$@"
