#!/usr/bin/env bash
# Set up (idempotent), build the seed's leak.c, and run the memleak recipe on it.
# BACKEND=bcc scripts/demo.sh uses BCC instead of bpftrace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p build
gcc -O0 -g -o build/leak tests/fixtures/leak.c      # -O0: gcc drops the unused malloc at -O2
echo "demo: probedsl run recipes/memleak.probe --backend ${BACKEND:-bpftrace} -- build/leak"
echo | .venv/bin/probedsl run recipes/memleak.probe --backend "${BACKEND:-bpftrace}" -- build/leak
