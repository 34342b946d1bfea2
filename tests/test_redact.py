"""`overdrive.redact`: no password, token or secret query value survives, whatever the URL."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from overdrive.redact import MASK, plain_traceback, redact, redact_text, redact_url

SCHEMES = st.sampled_from(
    ["redis", "rediss", "postgresql", "postgresql+asyncpg", "mysql", "amqp", "http", "https"]
)
# Hosts, users, paths and ordinary query values: never an uppercase letter, so a secret
# (always holding one) cannot appear in them by chance.
PLAIN = st.text(string.ascii_lowercase + string.digits + ".-_", min_size=1, max_size=12)
HOST = st.one_of(PLAIN, st.just("[::1]"), st.just("10.0.0.7"))
PORT = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
PATH = st.lists(PLAIN, max_size=3).map(lambda parts: "".join("/" + p for p in parts))
# What a password may hold unescaped: every printable character but whitespace, the
# quotes and brackets that end a URL in text, and the "/", "?", "#" that end its authority.
PASSWORD_CHARS = "".join(c for c in string.printable if c not in string.whitespace + "'\"<>`/?#")
SECRET = st.text(PASSWORD_CHARS, max_size=16).map(lambda s: "Q" + s)
QUERY_SECRET = st.text(PASSWORD_CHARS.replace("&", ""), max_size=16).map(lambda s: "Q" + s)
SECRET_PARAM = st.sampled_from(
    ["password", "PASSWORD", "sslpassword", "token", "access_token", "api_key", "X-Api-Key",
     "secret", "client_secret", "auth"]
)  # fmt: skip
PLAIN_PARAM = st.sampled_from(["db", "ssl", "timeout", "sslmode", "application_name"])


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """(url, the same url redacted as expected, its secrets)."""
    scheme, host, port, path = draw(SCHEMES), draw(HOST), draw(PORT), draw(PATH)
    secrets: list[str] = []
    userinfo = expected_userinfo = ""
    shape = draw(st.sampled_from(["none", "user", "password", "empty user"]))
    if shape == "user":  # a bare user info may be a token: masked whole
        token = draw(SECRET).replace(":", "").replace("@", "")
        userinfo, expected_userinfo = f"{token}@", f"{MASK}@"
        secrets.append(token)
    elif shape in ("password", "empty user"):
        user = "" if shape == "empty user" else draw(PLAIN)
        password = draw(SECRET)
        userinfo, expected_userinfo = f"{user}:{password}@", f"{user}:{MASK}@"
        secrets.append(password)
    params, expected_params = [], []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            name, value = draw(SECRET_PARAM), draw(QUERY_SECRET)
            params.append(f"{name}={value}")
            expected_params.append(f"{name}={MASK}")
            secrets.append(value)
        else:
            pair = f"{draw(PLAIN_PARAM)}={draw(PLAIN)}"
            params.append(pair)
            expected_params.append(pair)
    query = "?" + "&".join(params) if params else ""
    expected_query = "?" + "&".join(expected_params) if params else ""
    url = f"{scheme}://{userinfo}{host}{port}{path}{query}"
    expected = f"{scheme}://{expected_userinfo}{host}{port}{path}{expected_query}"
    return url, expected, secrets


@given(urls())
def test_every_url_shape_is_redacted_exactly(case: tuple[str, str, list[str]]) -> None:
    url, expected, secrets = case
    out = redact_url(url)
    assert out == expected
    for secret in secrets:
        assert secret not in out


@given(urls(), PLAIN)
def test_urls_inside_text_are_redacted(case: tuple[str, str, list[str]], word: str) -> None:
    url, expected, secrets = case
    text = f"ConnectionError: could not reach {url} ({word}); retrying '{url}'"
    out = redact_text(text)
    assert out == f"ConnectionError: could not reach {expected} ({word}); retrying '{expected}'"
    assert all(secret not in out for secret in secrets)


@given(urls())
def test_redaction_is_idempotent(case: tuple[str, str, list[str]]) -> None:
    once = redact_url(case[0])
    assert redact_url(once) == once


def test_the_shapes_the_issue_names() -> None:
    assert redact_url("redis://default:ss@word@h:6379/0") == "redis://default:***@h:6379/0"
    assert (
        redact_url("postgresql://app@db/test?password=hunter2-s3cret&sslmode=require")
        == "postgresql://***@db/test?password=***&sslmode=require"
    )
    assert redact_url("https://svc:tok3n@recommender.internal/v1") == (
        "https://svc:***@recommender.internal/v1"
    )
    # An unescaped "/" in a password: redacted, though no client parses it either.
    assert redact_url("redis://u:pa/ss@cache:6379") == "redis://u:***@cache:6379"
    # No user info: "@" in a path or a query value is left alone.
    assert redact_url("http://host:8080/users/a@b.com") == "http://host:8080/users/a@b.com"
    assert redact_url("http://[::1]:8080/a@b") == "http://[::1]:8080/a@b"
    assert redact_url("sqlite+aiosqlite:///tmp/x.db") == "sqlite+aiosqlite:///tmp/x.db"
    assert redact_url("no url here") == "no url here"


def test_nested_values_and_secret_keys() -> None:
    value = {
        "pools": {"databases": {"main": {"url": "postgresql://u:pw@db/x"}}},
        "http": [{"base_url": "https://u:pw@api"}],
        "stats": {"token": "change-me-please", "public": False},
        "unset": {"password": None, "token": ""},
        "ratelimit": {"tokens": 17, "token_bucket": 3.5},
        "plain": ("a", 1, 2.0),
    }
    assert redact(value) == {
        "pools": {"databases": {"main": {"url": "postgresql://u:***@db/x"}}},
        "http": [{"base_url": "https://u:***@api"}],
        "stats": {"token": MASK, "public": False},
        "unset": {"password": None, "token": ""},
        "ratelimit": {"tokens": 17, "token_bucket": 3.5},
        "plain": ["a", 1, 2.0],
    }


def test_a_plain_traceback_has_no_locals_and_no_password() -> None:
    def failing(authorization: str) -> None:
        header_value = authorization  # a local that rich tracebacks would show
        raise ConnectionError(f"cannot reach redis://default:{header_value}@cache:6379")

    secret = "".join(["Bearer-", "Zs3", "cret"])  # not in the source lines a traceback quotes
    try:
        failing(secret)
    except ConnectionError as exc:
        text = plain_traceback(exc)
    assert "Zs3cret" not in text
    assert "redis://default:***@cache:6379" in text
    assert "failing" in text and "ConnectionError" in text
