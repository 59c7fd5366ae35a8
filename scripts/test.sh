#!/usr/bin/env bash
# Install pointsman with its test tools and real peers, then run lint, types and every test that
# belongs in CI (slow soak and benchmark runs are marked `slow` and left out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"  # tests start `pointsman`, `exabgp` and `promtool` by name
.venv/bin/ruff check pointsman tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -m "not slow" -q -p no:cacheprovider "$@"
