"""``TRANSIENT_ERRORS``: the failures worth trying again, for the clients people use.

``(ConnectionError, TimeoutError)`` alone misses ``requests.ConnectionError``,
``httpx.ConnectError`` and the rest: none of them derive from the builtins. So the
default ``RetryPolicy.retry_on`` is built from whichever of these libraries are
importable when ``resilient_tasks`` is imported (none of them is a dependency):

=========  ====================================================================
builtins   ``ConnectionError``, ``TimeoutError`` (``socket.timeout``)
requests   ``ConnectionError`` (not its ``SSLError``), ``Timeout``,
           ``ChunkedEncodingError``, ``RetryError``; ``HTTPError`` by status
urllib3    ``TimeoutError``, ``NewConnectionError``, ``ProtocolError``,
           ``ResponseError``; ``MaxRetryError`` when its ``reason`` is transient
httpx      ``TimeoutException``, ``NetworkError``, ``RemoteProtocolError``;
           ``HTTPStatusError`` by status
redis      ``ConnectionError`` (not ``AuthenticationError``/``AuthorizationError``),
           ``TimeoutError``, ``BusyLoadingError``, ``ReadOnlyError`` (failover),
           ``TryAgainError``, ``ClusterDownError``
aiohttp    ``ClientConnectionError`` (not ``ClientSSLError``); ``ClientResponseError``
           by status
=========  ====================================================================

"By status": the response was 408, 429 or a 5xx other than 501 and 505 (which never
change on a retry). A certificate or password error is not transient: retrying it only
hides a misconfiguration.

``TRANSIENT_ERRORS`` is a tuple of the always-transient types, so ``isinstance(exc,
TRANSIENT_ERRORS)`` and ``except TRANSIENT_ERRORS`` work as with any tuple (mypy accepts
only a plain tuple after ``except``: write ``except tuple(TRANSIENT_ERRORS)``); calling
it, ``TRANSIENT_ERRORS(exc)``, applies the whole rule above (exclusions, status codes,
wrapped reasons), and that is what a policy does with it. It is built once, when
``resilient_tasks`` is imported, so those libraries installed then are imported then.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

__all__ = ["TRANSIENT_ERRORS", "TRANSIENT_STATUSES", "TransientErrors", "transient_errors"]

#: HTTP statuses worth a retry: request timeout, too many requests, and server errors
#: except 501 Not Implemented and 505 HTTP Version Not Supported.
TRANSIENT_STATUSES = frozenset({408, 429, *(s for s in range(500, 600) if s not in (501, 505))})

#: Types that are transient whatever they carry.
ALWAYS = (
    "requests.exceptions.ConnectionError",
    "requests.exceptions.Timeout",
    "requests.exceptions.ChunkedEncodingError",
    "requests.exceptions.RetryError",
    "urllib3.exceptions.TimeoutError",
    "urllib3.exceptions.NewConnectionError",
    "urllib3.exceptions.ProtocolError",
    "urllib3.exceptions.ResponseError",
    "httpx.TimeoutException",
    "httpx.NetworkError",
    "httpx.RemoteProtocolError",
    "redis.exceptions.ConnectionError",
    "redis.exceptions.TimeoutError",
    "redis.exceptions.ReadOnlyError",
    "redis.exceptions.TryAgainError",
    "redis.exceptions.ClusterDownError",
    "aiohttp.ClientConnectionError",
)
#: Subclasses of those that a retry cannot fix.
NEVER = (
    "requests.exceptions.SSLError",
    "redis.exceptions.AuthenticationError",
    "redis.exceptions.AuthorizationError",
    "aiohttp.ClientSSLError",
)
#: Errors raised for an HTTP response: transient when the status is.
BY_STATUS = (
    "requests.exceptions.HTTPError",
    "httpx.HTTPStatusError",
    "aiohttp.ClientResponseError",
)
#: Errors wrapping another in ``reason``: transient when the reason is.
BY_REASON = ("urllib3.exceptions.MaxRetryError",)


def _types(names: Iterable[str]) -> tuple[type[BaseException], ...]:
    """The exception types among ``names`` that can be imported here; others are skipped."""
    found: list[type[BaseException]] = []
    for dotted in names:
        module, _, attr = dotted.rpartition(".")
        try:
            value = getattr(importlib.import_module(module), attr)
        except Exception:  # not installed, another version, or a broken install: skip it
            continue
        if isinstance(value, type) and issubclass(value, BaseException) and value not in found:
            found.append(value)
    return tuple(found)


def _status(exc: BaseException) -> int | None:
    """The HTTP status an HTTP client's error carries (``response.status_code`` or ``status``)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        status = getattr(exc, "status", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


class TransientErrors(tuple[type[BaseException], ...]):
    """A tuple of exception types that is also a predicate with the full rule.

    Equal only to another ``TransientErrors`` with the same types: a plain tuple of the
    same types matches fewer failures (no status codes), so it is not the same policy.
    """

    never: tuple[type[BaseException], ...]
    by_status: tuple[type[BaseException], ...]
    by_reason: tuple[type[BaseException], ...]
    name: str

    def __new__(
        cls,
        always: Iterable[type[BaseException]],
        *,
        never: Iterable[type[BaseException]] = (),
        by_status: Iterable[type[BaseException]] = (),
        by_reason: Iterable[type[BaseException]] = (),
        name: str = "TransientErrors",
    ) -> TransientErrors:
        self = super().__new__(cls, tuple(always))
        self.never = tuple(never)
        self.by_status = tuple(by_status)
        self.by_reason = tuple(by_reason)
        self.name = name
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[object, ...], dict[str, object]]:
        extra = {"never": self.never, "by_status": self.by_status, "by_reason": self.by_reason}
        return (tuple(self),), {**extra, "name": self.name}

    def __call__(self, exc: BaseException) -> bool:
        """True when ``exc`` is worth a retry (the rule in the module's docstring)."""
        for _ in range(5):  # a wrapper's reason, at most a few levels deep
            if isinstance(exc, self.never):
                return False
            if isinstance(exc, self):
                return True
            if isinstance(exc, self.by_status):
                return _status(exc) in TRANSIENT_STATUSES
            reason = getattr(exc, "reason", None) if isinstance(exc, self.by_reason) else None
            if not isinstance(reason, BaseException):
                return False
            exc = reason
        return False

    def _key(self) -> tuple[object, ...]:
        return (tuple(self), self.never, self.by_status, self.by_reason)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransientErrors) and self._key() == other._key()

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((TransientErrors, *self._key()))

    def __repr__(self) -> str:
        return self.name


def transient_errors() -> TransientErrors:
    """Build the matcher from the libraries importable now (``TRANSIENT_ERRORS`` is one)."""
    return TransientErrors(
        (ConnectionError, TimeoutError, *_types(ALWAYS)),
        never=_types(NEVER),
        by_status=_types(BY_STATUS),
        by_reason=_types(BY_REASON),
        name="TRANSIENT_ERRORS",
    )


#: Connect errors, timeouts and 5xx/429 responses of every HTTP/Redis client installed.
TRANSIENT_ERRORS: TransientErrors = transient_errors()
