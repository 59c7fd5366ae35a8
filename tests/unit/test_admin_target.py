"""Which admin API and token the CLI uses: flags, -c config, environment, default (pure parts
plus reading the admin section of a real file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointsman.admin.target import (
    DEFAULT_URL,
    Layer,
    Target,
    admin_section,
    choose,
    config_layer,
    read_token,
    url_for,
)
from pointsman.config.loader import ConfigError
from pointsman.config.model import AdminConfig

FLAGS = Layer("http://flag:1", "flag.token", None, "--token-file")
CONFIG = Layer("http://config:2", "config.token", None, "pm.yaml admin.token_file")
ENV = Layer("http://env:3", None, "literal", "POINTSMAN_TOKEN_FILE")


def test_first_layer_that_says_something_wins_for_url_and_token_separately() -> None:
    assert choose([FLAGS, CONFIG, ENV]) == Target("http://flag:1", "flag.token", None, "--token-file")
    assert choose([Layer(), CONFIG, ENV]) == Target("http://config:2", "config.token", None,
                                                    "pm.yaml admin.token_file")
    # --admin on the command line, token from the config
    assert choose([Layer(url="http://flag:1"), CONFIG]) == Target(
        "http://flag:1", "config.token", None, "pm.yaml admin.token_file")
    # a config without token_file lets POINTSMAN_TOKEN through
    assert choose([Layer(url="http://config:2"), ENV]) == Target(
        "http://config:2", None, "literal", "POINTSMAN_TOKEN_FILE")


def test_nothing_said_is_the_default_without_token() -> None:
    assert choose([]) == choose([Layer(), Layer()]) == Target(DEFAULT_URL, None, None, "")


def test_a_token_file_beats_a_literal_token_of_the_same_layer() -> None:
    assert choose([Layer(token_file="f", token="t")]).token is None


@pytest.mark.parametrize(("bind", "url"), [
    ("127.0.0.1:9900", "http://127.0.0.1:9900"),
    ("0.0.0.0:9901", "http://127.0.0.1:9901"),
    ("[::]:9902", "http://[::1]:9902"),
    ("[::1]:9903", "http://[::1]:9903"),
    ("10.1.2.3:80", "http://10.1.2.3:80"),
    ("localhost:9904", "http://localhost:9904"),
])
def test_url_for_reaches_wildcard_binds_through_loopback(bind: str, url: str) -> None:
    assert url_for(AdminConfig.model_validate({"bind": bind})) == url


def test_config_layer_reads_only_the_admin_section(tmp_path: Path) -> None:
    path = tmp_path / "pm.yaml"
    # the rest of the file is broken: reload -c must still reach the node to hear why
    path.write_text("listeners: [{name: lb}]\nadmin:\n  bind: '0.0.0.0:9911'\n  token_file: t\n")
    assert config_layer(str(path)) == Layer("http://127.0.0.1:9911", "t", None,
                                            f"{path} admin.token_file")


def test_admin_section_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pm.yaml"
    path.write_text("listeners: []\nadmin:\n  bind: '127.0.0.1'\n  tokenfile: t\n")
    with pytest.raises(ConfigError) as caught:
        admin_section(str(path))
    assert [str(i) for i in caught.value.issues] == [
        f"{path}:3: admin.bind: expected host:port, got '127.0.0.1'",
        f"{path}:4: admin.tokenfile: unknown key (did you mean 'token_file'?)",
    ]
    path.write_text("listeners: []\n")
    with pytest.raises(ConfigError, match="no admin section"):
        admin_section(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        admin_section(str(tmp_path / "missing.yaml"))


def test_read_token_says_why_it_has_none(tmp_path: Path) -> None:
    token, empty = tmp_path / "token", tmp_path / "empty"
    token.write_text("s3cret\n")
    empty.write_text("\n")
    assert read_token(Target("u", str(token), None, "o")) == ("s3cret", None)
    assert read_token(Target("u", None, "literal", "o")) == ("literal", None)
    assert read_token(Target("u", None, None, "")) == (None, None)
    assert read_token(Target("u", str(empty), None, "pm.yaml admin.token_file")) == (
        None, f"token file {empty} (pm.yaml admin.token_file) is empty")
    missing = tmp_path / "missing"
    assert read_token(Target("u", str(missing), None, "--token-file")) == (
        None, f"cannot read token file {missing} (--token-file): No such file or directory")
