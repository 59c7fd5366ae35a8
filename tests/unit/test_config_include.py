"""include: [conf.d/*.yaml]: listeners and pools merged from other files, errors named per file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pointsman.config.loader import ConfigError, load_file, load_text


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def issues(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_file(path, environ=environ or {})
    return [str(i) for i in caught.value.issues]


MAIN = """
    include: [conf.d/*.yaml]
    admin: {bind: "127.0.0.1:9900"}
    listeners:
      - name: main
        bind: "127.0.0.1:7000"
        pool: web
"""

WEB = """
    pools:
      - name: web
        backends: [{address: "127.0.0.1:8001"}]
"""

DB = """
    listeners:
      - name: db
        bind: "127.0.0.1:7001"
        pool: db
    pools:
      - name: db
        backends: [{address: "${DB_BACKEND:-127.0.0.1:5432}"}]
"""


def test_listeners_and_pools_are_merged_in_sorted_order(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN)
    write(tmp_path / "conf.d" / "20-web.yaml", WEB)
    write(tmp_path / "conf.d" / "10-db.yaml", DB)
    write(tmp_path / "conf.d" / "notes.txt", "not yaml: [")
    config = load_file(main, environ={"DB_BACKEND": "127.0.0.1:6543"})
    assert [lst.name for lst in config.listeners] == ["main", "db"]
    assert [p.name for p in config.pools] == ["db", "web"]
    assert str(config.pool("db").backends[0].address) == "127.0.0.1:6543"
    assert config.admin is not None


def test_a_glob_matching_nothing_is_fine_a_missing_file_is_not(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN.replace("[conf.d/*.yaml]",
                                                           "[conf.d/*.yaml, extra.yaml]") + WEB)
    assert issues(main) == [f"{main}:1: include[1]: no such file: {tmp_path}/extra.yaml"]
    write(tmp_path / "extra.yaml", "pools: []\n")
    assert [p.name for p in load_file(main, environ={}).pools] == ["web"]


def test_errors_name_the_included_file_and_its_line(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN)
    web = write(tmp_path / "conf.d" / "web.yaml", """
        pools:
          - name: web
            algorithm: fastest
            backends:
              - address: "127.0.0.1"
    """)
    assert issues(main) == [
        f"{web}:3: pools[0].algorithm: expected one of 'round_robin', 'weighted_round_robin', "
        "'least_connections', 'power_of_two', 'source_hash' or 'maglev', got 'fastest'",
        f"{web}:5: pools[0].backends[0].address: expected host:port, got '127.0.0.1'",
    ]


def test_duplicates_across_files_name_both_places(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN + WEB)
    other = write(tmp_path / "conf.d" / "web.yaml", WEB.replace("8001", "8002") + """
    listeners:
      - name: main
        bind: "127.0.0.1:7000"
        pool: web
    """)
    assert issues(main) == [
        f"{other}:2: pools[0]: duplicate name 'web' (first at {main}:9, pools[0])",
        f"{other}:6: listeners[0]: duplicate name 'main' (first at {main}:4, listeners[0])",
        f"{other}:7: listeners[0].bind: same address as listeners[0] in {main}:4",
    ]


def test_an_included_file_holds_only_listeners_and_pools(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN)
    web = write(tmp_path / "conf.d" / "web.yaml", WEB + """
    admin: {bind: "127.0.0.1:9901"}
    include: [more/*.yaml]
    """)
    assert issues(main) == [
        f"{web}:5: admin: an included file may hold only listeners and pools "
        f"(included from {main}:1)",
        f"{web}:6: include: an included file may hold only listeners and pools "
        f"(included from {main}:1)",
    ]


def test_included_files_expand_the_environment_with_their_own_lines(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN + WEB)
    db = write(tmp_path / "conf.d" / "db.yaml", DB.replace("${DB_BACKEND:-127.0.0.1:5432}",
                                                            "${DB_BACKEND}"))
    assert issues(main) == [f"{db}:7: pools[0].backends[0].address: environment variable "
                            "DB_BACKEND is not set (write ${DB_BACKEND:-default} to give a default)"]


def test_include_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="include needs a config file"):
        load_text(textwrap.dedent(MAIN + WEB), "etcd:/pointsman/config", environ={})


def test_include_must_be_a_list_of_names(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN.replace("[conf.d/*.yaml]", "conf.d") + WEB)
    assert issues(main) == [f"{main}:1: include: expected a list of file names or globs, e.g. "
                            "[conf.d/*.yaml]"]


def test_the_including_file_is_never_included_again(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", MAIN.replace("conf.d/*.yaml", '"*.yaml"') + WEB)
    assert [p.name for p in load_file(main, environ={}).pools] == ["web"]
