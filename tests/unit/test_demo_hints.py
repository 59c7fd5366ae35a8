"""The demo's printed commands, as printed: which `pointsman` to show and which options."""

from __future__ import annotations

import pytest

from pointsman.demo import hints, invocation


def which(table: dict[str, str]):  # type: ignore[no-untyped-def]
    return table.get


@pytest.mark.parametrize(("argv0", "path", "shown"), [
    # scripts/demo.sh from the clone: the venv is not on PATH
    ("/src/pm/.venv/bin/pointsman", {}, ".venv/bin/pointsman"),
    (".venv/bin/pointsman", {"pointsman": "/usr/bin/pointsman"}, ".venv/bin/pointsman"),
    # an activated venv or pipx: PATH finds this very one
    ("/src/pm/.venv/bin/pointsman", {"pointsman": "/src/pm/.venv/bin/pointsman"}, "pointsman"),
    ("/root/.local/bin/pointsman", {"pointsman": "/root/.local/bin/pointsman"}, "pointsman"),
    # started from elsewhere: the full path
    ("/opt/pm/.venv/bin/pointsman", {}, "/opt/pm/.venv/bin/pointsman"),
])
def test_invocation_of_the_console_script(argv0: str, path: dict[str, str], shown: str) -> None:
    assert invocation(argv0, "/src/pm", "/src/pm/.venv/bin/python", which(path)) == shown


@pytest.mark.parametrize(("executable", "path", "shown"), [
    ("/src/pm/.venv/bin/python", {}, ".venv/bin/python -m pointsman"),
    ("/src/pm/.venv/bin/python", {"python": "/usr/bin/python"}, ".venv/bin/python -m pointsman"),
    ("/src/pm/.venv/bin/python", {"python": "/src/pm/.venv/bin/python"}, "python -m pointsman"),
    ("/usr/bin/python3", {"python3": "/usr/bin/python3"}, "python3 -m pointsman"),
])
def test_invocation_as_a_module(executable: str, path: dict[str, str], shown: str) -> None:
    argv0 = "/src/pm/pointsman/__main__.py"
    assert invocation(argv0, "/src/pm", executable, which(path)) == shown


def test_hints_with_the_default_admin_port_and_socat() -> None:
    text = hints(8800, 9900, [4001, 4002, 4003], ".venv/bin/pointsman", has_socat=True)
    assert text.splitlines() == [
        "",
        "pointsman demo: backends backend-1, backend-2, backend-3 on ports 4001, 4002, 4003, "
        "behind 127.0.0.1:8800; connection engine cython.",
        "Try:  echo hi | socat - TCP:127.0.0.1:8800    (a few times: round robin)",
        "      open http://127.0.0.1:9900/    (status page)",
        "      .venv/bin/pointsman status",
        "      .venv/bin/pointsman drain demo backend-1    (then: enable, the same way)",
        "Stop with Ctrl-C.",
    ]


def test_hints_say_how_to_build_the_compiled_engine_when_it_is_not_in_use() -> None:
    text = hints(8800, 9900, [1, 2, 3], "pointsman", has_socat=True, engine="python")
    assert text.splitlines()[1].endswith(
        "; connection engine python (bash scripts/setup.sh --engine builds the compiled one).")


def test_hints_name_a_non_default_admin_port_and_need_no_socat() -> None:
    lines = hints(8801, 9911, [1, 2, 3], "pointsman", has_socat=False).splitlines()
    assert lines[2] == ("Try:  bash -c 'exec 3<>/dev/tcp/127.0.0.1/8801; echo hi >&3; head -2 <&3'"
                        "    (a few times: round robin)")
    assert "      pointsman status --admin http://127.0.0.1:9911" in lines
    assert ("      pointsman drain demo backend-1 --admin http://127.0.0.1:9911"
            "    (then: enable, the same way)") in lines


def test_no_admin_api_no_admin_hints() -> None:
    text = hints(8800, 0, [1, 2, 3], "pointsman", has_socat=True)
    assert "status" not in text and "drain" not in text
