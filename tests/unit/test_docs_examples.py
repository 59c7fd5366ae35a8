"""Every complete config shown to operators (README, docs/config.md) passes `check`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pointsman.config.loader import load_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [
    (path, block)
    for path in (ROOT / "README.md", ROOT / "docs" / "config.md")
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)
    if "listeners:" in block and "pools:" in block
]


@pytest.mark.parametrize(("path", "block"), EXAMPLES, ids=[str(p.name) for p, _ in EXAMPLES])
def test_example_config_is_valid(path: Path, block: str) -> None:
    config = load_text(block, str(path))
    assert config.listeners and config.pools


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
