#!/usr/bin/env bash
# Sets everything up on first use, then runs the main job: the quick experiment, Standard vs MoD vs
# DTF trained and compared in one report (`dtlab run experiments/quick.yaml`). Arguments replace the command.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
if [ $# -eq 0 ]; then set -- run experiments/quick.yaml; fi
exec dtlab "$@"
