"""Loading a config text in unit tests: the config as loaded, or the issues as an operator reads
them (file, line, field)."""

from __future__ import annotations

import textwrap

import pytest

from pointsman.config.loader import ConfigError, load_text
from pointsman.config.model import Config

SOURCE = "pointsman.yaml"


def load(text: str) -> Config:
    """`text` (indented as in a test) loaded as the file `SOURCE`, with no environment."""
    return load_text(textwrap.dedent(text).lstrip("\n"), SOURCE, environ={})


def errors(text: str) -> list[str]:
    """The issues loading `text` reports (it must fail)."""
    with pytest.raises(ConfigError) as caught:
        load(text)
    return [str(issue) for issue in caught.value.issues]
