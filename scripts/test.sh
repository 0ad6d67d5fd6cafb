#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, tracing tests included (needs root).
# --under-load (first argument): the same while scripts/under-load.sh keeps the machine busy.
# Other arguments go to pytest (e.g. -m lifecycle).
set -euo pipefail
cd "$(dirname "$0")/.."
load=()
if [ "${1:-}" = --under-load ]; then shift; load=(bash scripts/under-load.sh); fi
bash scripts/setup.sh
exec "${load[@]}" .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
