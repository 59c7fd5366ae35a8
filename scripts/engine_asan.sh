#!/usr/bin/env bash
# Build the compiled engine with AddressSanitizer in a scratch copy of the tree and run the
# engine tests against it (compiled engine only). Out of the normal CI run: the slow test
# tests/integration/test_engine_asan.py runs this; so can you, with extra pytest arguments:
#     bash scripts/engine_asan.sh [-x] [-k resets]
# Python is not built with ASAN, so libasan is preloaded; PYTHONMALLOC=malloc sends Python's
# own objects (the engine's Conn objects included) through the checked allocator too. Leak
# checking is off: CPython frees little at exit by design.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d /tmp/pointsman-asan.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

cp -r "$ROOT/pointsman" "$ROOT/tests" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$WORK/"
cd "$WORK"
find . -name '__pycache__' -prune -exec rm -rf {} +
rm -f pointsman/proxy/engine/_engine*.so pointsman/proxy/engine/_engine.c
rm -f pointsman/proxy/engine/_udp*.so pointsman/proxy/engine/_udp.c
rm -f pointsman/proxy/_policy*.so pointsman/proxy/_policy.c
POINTSMAN_ENGINE_CFLAGS="-O1 -g -fsanitize=address -fno-omit-frame-pointer" \
POINTSMAN_ENGINE_LDFLAGS="-fsanitize=address" \
    "$PY" setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying|creating)" || true
ls pointsman/proxy/engine/_engine*.so >/dev/null || { echo "engine_asan: build failed" >&2; exit 2; }

LIBASAN=$(gcc -print-file-name=libasan.so)
export PYTHONPATH="$WORK" POINTSMAN_ENGINE=cython PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
# Proof that the instrumented build is the one imported.
LD_PRELOAD="$LIBASAN" "$PY" -c "
import pointsman.proxy.engine._engine as e, sys
assert e.__file__.startswith('$WORK'), e.__file__
print('engine_asan: testing', e.__file__)"
LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -k "cython" \
    tests/unit/engine tests/integration/test_engine_relay.py tests/integration/test_engine_resets.py \
    tests/integration/test_engine_connect.py tests/integration/test_engine_lifecycle.py \
    tests/integration/test_engine_udp.py tests/integration/test_udp_plane.py \
    tests/unit/proxy/test_fold.py "$@"
# The engine waiting for uvloop (compiled only; its scenarios run in children, which inherit
# the preload).
LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/integration/test_engine_loop_wait.py "$@"
