"""Which admin API the CLI talks to, and with which token: flags, a config file, the environment.

An operator on a node runs `pointsman status -c /etc/pointsman/pointsman.yaml` (or sets
POINTSMAN_CONFIG once) and every admin command then uses that config's `admin.bind` and
`admin.token_file`, as `haproxy` finds its stats socket in haproxy.cfg. The order, first wins:

1. `--admin URL` / `--token-file FILE` on the command line;
2. `-c/--config FILE` on the command line (its admin section);
3. POINTSMAN_ADMIN / POINTSMAN_TOKEN_FILE / POINTSMAN_TOKEN in the environment;
4. POINTSMAN_CONFIG in the environment (its admin section);
5. http://127.0.0.1:9900 and no token.

Only the `admin` section of the config is read and checked, so `reload -c FILE` still reaches the
node when the rest of FILE has the errors the node's 422 answer then lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pointsman.config.addresses import HostPort
from pointsman.config.loader import (
    ConfigError,
    ConfigIssue,
    _line_for,
    _message,
    _parse_yaml,
    format_loc,
    read_text,
)
from pointsman.config.model import AdminConfig

DEFAULT_URL = "http://127.0.0.1:9900"

# A wildcard bind accepts on every local address; the CLI reaches it through loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class Layer:
    """What one place (flags, a config, the environment) says; None: it says nothing."""

    url: str | None = None
    token_file: str | None = None
    token: str | None = None
    origin: str = ""  # e.g. "pointsman.yaml admin.token_file", for messages


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    token_file: str | None
    token: str | None
    token_origin: str


def choose(layers: list[Layer]) -> Target:
    """First URL and first token (file or literal) of the layers, in order (pure)."""
    url = next((layer.url for layer in layers if layer.url), DEFAULT_URL)
    for layer in layers:
        if layer.token_file or layer.token:
            return Target(url, layer.token_file, layer.token if not layer.token_file else None,
                          layer.origin)
    return Target(url, None, None, "")


def url_for(admin: AdminConfig) -> str:
    """The URL the CLI uses for an admin section (wildcard binds through loopback)."""
    bind = admin.bind
    host = _WILDCARDS.get(bind.host, bind.host)
    # https once the admin listener has TLS material (a key the admin server's config adds).
    scheme = "https" if getattr(admin, "tls", None) is not None else "http"
    return f"{scheme}://{HostPort(host, bind.port)}"


def admin_section(path: str) -> AdminConfig:
    """The admin section of the config (or node) file at `path`; ConfigError naming the file,
    line and field when it is missing or wrong. Nothing else of the file is validated."""
    data, lines = _parse_yaml(read_text(path), path)
    raw = data.get("admin") if isinstance(data, dict) else None
    if raw is None:
        raise ConfigError([ConfigIssue(path, None, "admin",
                                       "no admin section: that pointsman runs no admin API")])
    try:
        return AdminConfig.model_validate(raw)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            loc = ("admin", *err["loc"])
            message = _message({**err, "loc": loc})  # "did you mean" looks keys up from the root
            issues.append(ConfigIssue(path, _line_for(loc, lines), format_loc(loc), message))
        raise ConfigError(issues) from None


def config_layer(path: str) -> Layer:
    """The layer a config file gives: its admin URL and token file (a relative token_file is
    relative to the working directory, as for the server that reads it)."""
    admin = admin_section(path)
    origin = f"{path} admin.token_file"
    return Layer(url_for(admin), admin.token_file, None, origin)


def read_token(target: Target) -> tuple[str | None, str | None]:
    """(token, why none could be read). A token file that cannot be read is not fatal here: reads
    need no token, and a 401 shows the reason next to its hint."""
    if target.token_file is None:
        return target.token, None
    try:
        token = Path(target.token_file).read_text().strip()
    except OSError as exc:
        return None, f"cannot read token file {target.token_file} ({target.token_origin}): {exc.strerror}"
    if not token:
        return None, f"token file {target.token_file} ({target.token_origin}) is empty"
    return token, None
