#!/usr/bin/env bash
# Install pointsman and run its built-in demo (3 local backends behind one listener).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pointsman demo "$@"
