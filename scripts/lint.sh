#!/usr/bin/env bash
# ruff (lint and format) and mypy, as configured in pyproject.toml; run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check probedsl backends tests bench
.venv/bin/ruff format --check probedsl backends tests bench
.venv/bin/mypy
