#!/usr/bin/env bash
# Sets everything up on first use, then runs the main job: the quick experiment, Standard vs MoD vs
# DTF trained and compared in one report (`dtlab run experiments/quick.yaml`). Options (--out DIR, --resume)
# go to that command; other arguments replace it (./run.sh bench).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- run experiments/quick.yaml "$@"; fi
exec dtlab "$@"
