#!/usr/bin/env bash
# Sets everything up on first use, then runs the main job (`dtlab demo` unless given a command).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
if [ $# -eq 0 ]; then set -- demo; fi
exec dtlab "$@"
