#!/usr/bin/env bash
# Run scripts/demo.sh and check that it reports the seed's leak: wrapper1's 40 bytes in 5 blocks.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
bash scripts/demo.sh > build/demo.out 2>&1 || { cat build/demo.out; echo "demo: scripts/demo.sh failed" >&2; exit 1; }
if grep -A1 -E "^ +40 +5 " build/demo.out | grep -q "wrapper1+"; then
  echo "demo: scripts/demo.sh reports wrapper1's 40 bytes in 5 blocks"
else
  cat build/demo.out; echo "demo: scripts/demo.sh did not report the seed leak" >&2; exit 1
fi
