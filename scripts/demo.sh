#!/usr/bin/env bash
# Install pointsman (runtime dependencies only) and run its built-in demo: 3 local backends behind
# one listener, the admin API and status page on 127.0.0.1:9900. Options go to `pointsman demo`
# (--port, --admin-port).
#
# A first install skips compiling the connection engine (about 10 s of CPU): the demo runs on the
# pure-Python engine, and says so. `bash scripts/setup.sh --engine` builds the compiled one.
set -euo pipefail
here=$PWD
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! "$root/.venv/bin/pointsman" --version >/dev/null 2>&1; then
    POINTSMAN_NO_EXTENSION=1 bash "$root/scripts/setup.sh"
fi
cd "$here"  # so the commands the demo prints are relative to where you are
exec "$root/.venv/bin/pointsman" demo "$@"
