#!/usr/bin/env bash
# Sets everything up on first use, then runs the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec python -m pytest "$@"
