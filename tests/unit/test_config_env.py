"""${VAR} expansion in config values: the grammar (pure) and how the loader types and reports it."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.config.envsubst import EnvError, expand
from pointsman.config.loader import ConfigError, load_text

ENV = {"HOST": "10.0.0.5", "PORT": "6432", "EMPTY": "", "ON": "true"}


@pytest.mark.parametrize(("text", "expected"), [
    ("${HOST}:${PORT}", "10.0.0.5:6432"),
    ("${MISSING:-127.0.0.1}:1", "127.0.0.1:1"),
    ("${EMPTY:-fallback}", "fallback"),  # as in sh, :- also covers a variable set but empty
    ("${EMPTY}", ""),
    ("${MISSING:-}", ""),
    ("$${HOST}", "${HOST}"),  # the escape
    ("cost: $5, ok$", "cost: $5, ok$"),  # other dollars are literal
    ("$$", "$$"),
    ("${MISSING:-a:b-c}", "a:b-c"),
])
def test_expansion(text: str, expected: str) -> None:
    assert expand(text, ENV) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("${MISSING}", "environment variable MISSING is not set"),
    ("${HOST", "unclosed ${"),
    ("${1X}", "bad variable reference"),
    ("${}", "bad variable reference"),
    ("${HOST:+x}", "bad variable reference"),
])
def test_bad_references(text: str, message: str) -> None:
    with pytest.raises(EnvError, match=message.replace("$", r"\$").replace("{", r"\{")):
        expand(text, ENV)


@given(st.text(alphabet=st.characters(blacklist_characters="$")))
def test_text_without_dollars_is_unchanged(text: str) -> None:
    assert expand(text, ENV) == text


@given(st.text(min_size=0, max_size=30).filter(lambda s: "}" not in s))
def test_defaults_come_back_verbatim(default: str) -> None:
    assert expand("${UNSET_FOR_TEST:-" + default + "}", {}) == default


CONFIG = """\
listeners:
  - name: db
    bind: "${BIND:-127.0.0.1}:${PORT}"
    pool: db
    max_connections: ${MAX}
pools:
  - name: db
    backends:
      - address: ${BACKEND}
        name: '${NAME}'
    health_check: {type: tcp, interval: "${INTERVAL:-2s}"}
"""


def test_the_loader_expands_and_types_values() -> None:
    env = {"PORT": "6432", "MAX": "500", "BACKEND": "10.1.1.1:5432", "NAME": "007"}
    config = load_text(CONFIG, "pointsman.yaml", environ=env)
    listener = config.listeners[0]
    assert str(listener.bind) == "127.0.0.1:6432"
    assert listener.max_connections == 500  # plain scalar: typed after expansion
    backend = config.pools[0].backends[0]
    assert backend.name == "007"  # quoted: stays a string (a plain 007 would be an int)
    assert config.pools[0].health_check is not None
    assert config.pools[0].health_check.interval == 2.0


def test_a_value_cannot_inject_yaml_structure() -> None:
    text = textwrap.dedent("""\
        listeners: [{name: a, bind: "127.0.0.1:1", pool: p}]
        pools:
          - name: p
            backends: [{address: "127.0.0.1:2"}]
            health_check:
              type: send_expect
              send: ${SEND}
              expect: ${EXPECT}
    """)
    env = {"SEND": "PING\n  expect: injected", "EXPECT": "[1, 2]"}
    check = load_text(text, "x.yaml", environ=env).pools[0].health_check
    assert check is not None
    assert (check.send, check.expect) == ("PING\n  expect: injected", "[1, 2]")


def test_every_unset_variable_is_named_with_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(CONFIG, "pointsman.yaml", environ={"MAX": "5"})
    assert [str(i) for i in caught.value.issues] == [
        "pointsman.yaml:3: listeners[0].bind: environment variable PORT is not set "
        "(write ${PORT:-default} to give a default)",
        "pointsman.yaml:9: pools[0].backends[0].address: environment variable BACKEND is not set "
        "(write ${BACKEND:-default} to give a default)",
        "pointsman.yaml:10: pools[0].backends[0].name: environment variable NAME is not set "
        "(write ${NAME:-default} to give a default)",
    ]


def test_comments_and_keys_are_not_expanded() -> None:
    text = textwrap.dedent("""\
        # ${NOT_EXPANDED} in a comment is fine
        listeners: [{name: a, bind: "127.0.0.1:1", pool: p}]
        pools: [{name: p, backends: [{address: "127.0.0.1:2"}]}]
    """)
    assert load_text(text, "x.yaml", environ={}).listeners[0].name == "a"


def test_expansion_can_be_turned_off() -> None:
    text = 'listeners: [{name: a, bind: "127.0.0.1:1", pool: p}]\n' \
           'pools: [{name: p, backends: [{address: "127.0.0.1:2"}], ' \
           'health_check: {type: send_expect, send: "${X}", expect: "+OK"}}]\n'
    config = load_text(text, "x.yaml", environ=None)
    assert config.pools[0].health_check is not None
    assert config.pools[0].health_check.send == "${X}"
