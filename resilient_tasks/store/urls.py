"""Store URLs: ``sentinel://`` parsing (redis-py parses the others), and keeping
passwords out of every message."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

__all__ = ["parse_sentinel_url", "redact", "secrets_of"]


# -- redaction --------------------------------------------------------------------------

_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^@/\s]*@", re.IGNORECASE)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without the userinfo of any URL in it, nor any of ``secrets``."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text



def secrets_of(url: str | None, *options: dict[str, Any] | None) -> tuple[str, ...]:
    """Every password a store was given (in its URL or its options), to keep them out of
    messages even where a library repeats one outside a URL."""
    found = []
    if url:
        with contextlib.suppress(ValueError):  # (a URL too broken to say)
            found.append(unquote(urlsplit(url).password or ""))
    for given in options:
        for name in ("password", "sentinel_password"):
            value = (given or {}).get(name)
            if value:
                found.append(str(value))
    return tuple(secret for secret in found if secret)


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


