"""The admin client's errors: the API's reason lines and a hint, from real HTTP answers'
status and body (the pure part: no network)."""

from __future__ import annotations

import json

from pointsman.admin.client import TOKEN_HINT, AdminClient, AdminError


def error(code: int, reason: str, body: object, token: str | None = None,
          note: str | None = None) -> AdminError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return AdminClient("http://x", token, token_note=note)._http_error(code, reason, raw)


def test_every_line_of_a_refused_reload_is_shown() -> None:
    lines = ["pm.yaml:3: listeners[0].bind: expected host:port, got '127.0.0.1'",
             "pm.yaml:4: listeners[0].pool: no pool named 'x'"]
    exc = error(422, "Unprocessable Entity", {"reloaded": False, "errors": lines})
    assert exc.status == 422
    assert exc.lines() == ["error: 422 Unprocessable Entity",
                           *(f"  {line}" for line in lines)]


def test_the_apis_error_is_the_message() -> None:
    exc = error(404, "Not Found", {"error": "no backend 'x' in pool 'p'; its backends: a, b"})
    assert exc.lines() == ["error: 404 Not Found: no backend 'x' in pool 'p'; its backends: a, b"]


def test_a_401_says_how_to_give_the_token() -> None:
    body = {"error": "a bearer token is required"}
    assert error(401, "Unauthorized", body).lines() == [
        "error: 401 Unauthorized: a bearer token is required",
        f"hint: no token was sent; {TOKEN_HINT}"]
    assert error(401, "Unauthorized", body, token="t").hint == (
        f"the token sent was refused; {TOKEN_HINT}")
    assert error(401, "Unauthorized", body, note="cannot read token file t (x): denied").hint == (
        f"cannot read token file t (x): denied; {TOKEN_HINT}")
    assert "--token-file" in TOKEN_HINT


def test_a_body_that_is_not_json_keeps_the_http_reason() -> None:
    assert str(error(502, "Bad Gateway", b"<html>")) == "502 Bad Gateway"
    assert str(error(500, "Internal Server Error", [1, 2])) == "500 Internal Server Error"


def test_cannot_reach_names_the_url_and_what_to_try() -> None:
    client = AdminClient("http://127.0.0.1:1", timeout=2.0)  # port 1: nothing listens there
    try:
        client.status()
    except AdminError as exc:
        assert str(exc).startswith("cannot reach the admin API at http://127.0.0.1:1: ")
        assert "-c CONFIG" in exc.hint
    else:
        raise AssertionError("expected an AdminError")
