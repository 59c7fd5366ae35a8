#!/usr/bin/env bash
# Install pointsman (runtime dependencies only) and run its built-in demo: 3 local backends behind
# one listener, the admin API and status page on 127.0.0.1:9900. Options go to `pointsman demo`
# (--port, --admin-port).
set -euo pipefail
here=$PWD
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$here"  # so the commands the demo prints are relative to where you are
exec "$root/.venv/bin/pointsman" demo "$@"
