"""`${VAR}` and `${VAR:-default}` in config values, expanded from the environment. Pure.

The grammar is the shell's, cut down to what a config needs:

* `${NAME}`: the variable's value; an unset variable is an error (a typo must not silently
  become an empty address). A variable set to the empty string gives the empty string.
* `${NAME:-default}`: the value, or `default` when the variable is unset or empty (as in sh).
  The default runs to the first `}`; it cannot itself hold `${...}`.
* `$${`: a literal `${` (so `$${HOME}` stays `${HOME}`). Any other `$` is literal too, so passwords,
  regexes (`expect_regex: "ok$"`) and `$$` elsewhere need no escaping.

NAME is `[A-Za-z_][A-Za-z0-9_]*`. A `${` that is never closed, or that holds anything else, is an
error rather than text passed through, for the same reason as an unset variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["EnvError", "expand"]

_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.S)


class EnvError(ValueError):
    """A reference that cannot be expanded; the message names it."""


def expand(value: str, environ: Mapping[str, str]) -> str:
    """`value` with every reference replaced; EnvError on the first bad or unset one."""
    if "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        body = match.group(1)
        if body is None:
            raise EnvError(f"unclosed ${{ in {value!r}")
        parsed = _BODY.fullmatch(body)
        if parsed is None:
            raise EnvError(f"bad variable reference {token!r}: expected ${{NAME}} or "
                           "${NAME:-default}")
        name, default = parsed.group("name"), parsed.group("default")
        found = environ.get(name)
        if default is not None:
            return found if found else default
        if found is None:
            raise EnvError(f"environment variable {name} is not set (write ${{{name}:-default}} "
                           "to give a default)")
        return found

    return _TOKEN.sub(substitute, value)

