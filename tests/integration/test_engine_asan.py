"""The compiled engine's tests under AddressSanitizer (scripts/engine_asan.sh): slow, out of CI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pointsman.proxy.engine import compiled_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not compiled_available() or shutil.which("gcc") is None,
                    reason="needs the compiled engine and gcc")
def test_engine_tests_pass_under_address_sanitizer() -> None:
    run = subprocess.run(["bash", str(ROOT / "scripts" / "engine_asan.sh")], capture_output=True,
                         text=True, timeout=900, check=False)
    output = run.stdout + run.stderr
    assert "AddressSanitizer" not in output, output[-4000:]
    assert run.returncode == 0, output[-4000:]
    assert "engine_asan: testing" in output and " passed" in output, output[-2000:]
