"""Store URLs: ``sentinel://`` parsing (redis-py parses the others), and keeping
passwords out of every message."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

__all__ = ["parse_sentinel_url", "password_pieces", "redact", "secrets_of"]


# -- redaction --------------------------------------------------------------------------

#: A run of text that may hold one URL: quotes, brackets and whitespace end it.
_TOKEN = re.compile(r"[^\s'\"<>()\[\]{}]+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
#: Passwords given as query arguments (redis-py passes any ``?name=value`` on).
_QUERY_SECRET = re.compile(r"(?P<name>(?:^|[?&;])[a-z_]*pass(?:word)?=)[^&;#\s'\"]*", re.IGNORECASE)
#: Where a password written raw in a URL ends its pieces (a ``/`` or ``@`` in it breaks parsing).
_PIECES = re.compile(r"[/@:?#]")


def _scrub(match: re.Match[str]) -> str:
    token = match.group(0)
    at = token.rfind("@")
    if at > 0:
        head = token[:at]
        scheme = _SCHEME.search(head)
        if scheme is not None:
            if scheme.end() < at:  # ``scheme://userinfo@...``: the userinfo goes
                token = f"{token[: scheme.end()]}***{token[at:]}"
        elif ":" in head:  # ``user:password@host`` (no scheme, or ``redis:/...``)
            token = f"***{token[at:]}"
    return _QUERY_SECRET.sub(r"\g<name>***", token)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without the userinfo of any URL in it (``scheme://user:password@host`` ->
    ``scheme://***@host``, also when the password holds a raw ``@`` or ``/``, or the
    scheme is missing or misspelt), without ``password=`` query arguments, and without any
    of ``secrets``. Every message, log line and CLI output of resilient-tasks that may
    hold a store URL or a redis-py error goes through here."""
    if "@" in text or "pass" in text.lower():
        text = _TOKEN.sub(_scrub, text)
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def _userinfo(url: str) -> str:
    """The userinfo of ``url`` read leniently (up to its last ``@``), for URLs too broken
    for ``urlsplit`` (a raw ``/`` in the password)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    head, at, _ = rest.rpartition("@")
    return head if at else ""


def secrets_of(url: str | None, *options: dict[str, Any] | None) -> tuple[str, ...]:
    """Every password a store was given (in its URL, raw and decoded, its query or its
    options), to keep them out of messages even where a library repeats one outside a URL."""
    found: list[str] = []
    if url:
        with contextlib.suppress(ValueError):  # (a URL too broken to say)
            password = urlsplit(url).password
            if password:
                found += [password, unquote(password)]
        userinfo = _userinfo(url.split("?", 1)[0])
        if ":" in userinfo:
            for raw in (userinfo.split(":", 1)[1], userinfo.rsplit(":", 1)[1]):
                found += [raw, unquote(raw)]
        with contextlib.suppress(ValueError):
            for name, values in parse_qs(urlsplit(url).query).items():
                if "pass" in name.lower():
                    found += values
    for given in options:
        for name in ("password", "sentinel_password"):
            value = (given or {}).get(name)
            if value:
                found.append(str(value))
    return tuple(dict.fromkeys(secret for secret in found if secret))


def password_pieces(url: str | None) -> tuple[str, ...]:
    """The parts of a raw password a URL parser may quote alone (``p/w`` read as a port
    ``p``), so a caller can tell that a parser's message holds part of one."""
    if not url:
        return ()
    userinfo = _userinfo(url.split("?", 1)[0])
    if ":" not in userinfo:
        return ()
    return tuple(piece for piece in _PIECES.split(userinfo.split(":", 1)[1]) if piece)


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``sentinel://[user:pw@]host:port[,host:port...][/db]?service_name=NAME[&...]``:
    the sentinels' addresses, and the master connection's options (``service_name``
    among them; ``sentinel_username``/``sentinel_password`` are for the sentinels)."""
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    options: dict[str, Any] = {}
    if userinfo:
        username, colon, password = userinfo.partition(":")
        if username:
            options["username"] = unquote(username)
        if colon:
            options["password"] = unquote(password)
    sentinels = []
    for address in hosts.split(","):
        if not address:
            continue
        host, colon, port = address.rpartition(":")
        if not colon or "]" in port:  # no port given (or only an IPv6 literal)
            host, port = address, "26379"
        try:
            sentinels.append((unquote(host.strip("[]")), int(port)))
        except ValueError:
            raise ValueError(f"sentinel URL: bad sentinel address {redact(address)!r}") from None
    if not sentinels:
        raise ValueError("sentinel URL: no sentinel host:port given")
    if path.strip("/"):
        try:
            options["db"] = int(path.strip("/"))
        except ValueError:
            raise ValueError(f"sentinel URL: bad database {path!r}") from None
    for name, values in parse_qs(query).items():
        value = values[0]
        parser: Any = URL_QUERY_ARGUMENT_PARSERS.get(name)
        if name == "ssl":
            options[name] = _flag(value)
        elif parser is not None:
            try:
                options[name] = parser(value)
            except (TypeError, ValueError):
                raise ValueError(f"sentinel URL: bad value for {name!r}") from None
        else:
            options[name] = value
    return sentinels, options
