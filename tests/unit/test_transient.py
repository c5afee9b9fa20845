"""``TRANSIENT_ERRORS`` matches what the real clients raise for connect errors, timeouts
and 5xx/429 responses, and nothing a retry cannot fix."""

from __future__ import annotations

import importlib
import pickle
import socket
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import resilient_tasks as rt
from resilient_tasks import transient
from resilient_tasks.policy import matches
from resilient_tasks.transient import TRANSIENT_ERRORS, TransientErrors, transient_errors


class _Status(BaseHTTPRequestHandler):
    """Answers ``GET /<status>`` with that status."""

    def do_GET(self) -> None:
        self.send_response(int(self.path.strip("/")))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> str:
    return f"http://127.0.0.1:{_free_port()}/"


def _raised(call: object) -> BaseException:
    try:
        call()  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("nothing was raised")


def test_builtins_match_and_other_errors_do_not() -> None:
    transient_: tuple[BaseException, ...] = (ConnectionRefusedError(), BrokenPipeError(), TimeoutError())
    for exc in transient_:
        assert TRANSIENT_ERRORS(exc) and isinstance(exc, TRANSIENT_ERRORS)
    permanent: tuple[BaseException, ...] = (ValueError(), KeyError("k"), rt.PolicyError("f", "r"), OSError())
    for exc in permanent:
        assert not TRANSIENT_ERRORS(exc)


def test_requests_connect_errors_timeouts_and_5xx_429_match(server: str, closed_port: str) -> None:
    requests = pytest.importorskip("requests")
    refused = _raised(lambda: requests.get(closed_port, timeout=5))
    assert isinstance(refused, requests.ConnectionError) and not isinstance(refused, ConnectionError)
    assert TRANSIENT_ERRORS(refused)
    assert TRANSIENT_ERRORS(requests.ReadTimeout()) and TRANSIENT_ERRORS(requests.ConnectTimeout())
    for status, transient_ in (
        (503, True),
        (500, True),
        (429, True),
        (408, True),
        (404, False),
        (501, False),
    ):
        error = _raised(lambda s=status: requests.get(f"{server}/{s}", timeout=5).raise_for_status())
        assert isinstance(error, requests.HTTPError)
        assert TRANSIENT_ERRORS(error) is transient_, status
        assert not isinstance(error, TRANSIENT_ERRORS), "a status error is matched by the call only"
    assert not TRANSIENT_ERRORS(requests.HTTPError("no response"))
    assert not TRANSIENT_ERRORS(requests.exceptions.SSLError("certificate verify failed"))


def test_httpx_connect_errors_timeouts_and_5xx_429_match(server: str, closed_port: str) -> None:
    httpx = pytest.importorskip("httpx")
    refused = _raised(lambda: httpx.get(closed_port, timeout=5))
    assert isinstance(refused, httpx.ConnectError) and TRANSIENT_ERRORS(refused)
    assert TRANSIENT_ERRORS(httpx.ReadTimeout("slow"))
    assert TRANSIENT_ERRORS(httpx.RemoteProtocolError("Server disconnected without sending a response."))
    for status, transient_ in ((502, True), (429, True), (400, False), (505, False)):
        error = _raised(lambda s=status: httpx.get(f"{server}/{s}", timeout=5).raise_for_status())
        assert isinstance(error, httpx.HTTPStatusError)
        assert TRANSIENT_ERRORS(error) is transient_, status
    assert not TRANSIENT_ERRORS(httpx.UnsupportedProtocol("ftp://"))


def test_urllib3_errors_match_and_a_max_retry_error_by_its_reason(closed_port: str) -> None:
    urllib3 = pytest.importorskip("urllib3")
    exceptions = urllib3.exceptions
    refused = _raised(lambda: urllib3.PoolManager().request("GET", closed_port, retries=False))
    assert TRANSIENT_ERRORS(refused), refused
    exhausted = _raised(lambda: urllib3.PoolManager().request("GET", closed_port, retries=1))
    assert isinstance(exhausted, exceptions.MaxRetryError) and TRANSIENT_ERRORS(exhausted)
    assert TRANSIENT_ERRORS(exceptions.ReadTimeoutError(None, "/", "read timed out"))
    assert not TRANSIENT_ERRORS(exceptions.MaxRetryError(None, "/", exceptions.SSLError("bad certificate")))


def test_redis_connection_errors_match_but_wrong_passwords_do_not() -> None:
    redis = pytest.importorskip("redis")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(port=_free_port(), socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    refused = _raised(client.ping)
    assert isinstance(refused, redis.ConnectionError) and TRANSIENT_ERRORS(refused)
    assert TRANSIENT_ERRORS(redis.TimeoutError()) and TRANSIENT_ERRORS(redis.exceptions.BusyLoadingError())
    assert TRANSIENT_ERRORS(
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica")
    )
    assert not TRANSIENT_ERRORS(redis.AuthenticationError("WRONGPASS"))
    assert not TRANSIENT_ERRORS(redis.exceptions.AuthorizationError("NOPERM"))
    assert not TRANSIENT_ERRORS(redis.ResponseError("WRONGTYPE"))


def test_every_name_of_an_installed_library_exists() -> None:
    """A renamed or mistyped class would be skipped silently: catch it here."""
    for dotted in (*transient.ALWAYS, *transient.NEVER, *transient.BY_STATUS, *transient.BY_REASON):
        module, _, attr = dotted.rpartition(".")
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        assert isinstance(getattr(found, attr, None), type), dotted


def test_aiohttp_errors_when_it_is_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    class ClientError(Exception):
        pass

    class ClientConnectionError(ClientError):
        pass

    class ClientSSLError(ClientConnectionError):
        pass

    class ClientResponseError(ClientError):
        def __init__(self, status: int) -> None:
            self.status = status

    fake = types.ModuleType("aiohttp")
    for cls in (ClientConnectionError, ClientSSLError, ClientResponseError):
        setattr(fake, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "aiohttp", fake)
    errors = transient_errors()
    assert errors(ClientConnectionError()) and not errors(ClientSSLError())
    assert errors(ClientResponseError(503)) and not errors(ClientResponseError(403))


def test_a_missing_library_is_simply_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("requests", "requests.exceptions", "httpx", "aiohttp"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    errors = transient_errors()
    assert not any(t.__module__.startswith(("requests", "httpx")) for t in (*errors, *errors.by_status))
    assert errors(ConnectionError()) and errors(TimeoutError())


def test_it_is_a_tuple_a_predicate_and_equal_only_to_itself() -> None:
    assert isinstance(TRANSIENT_ERRORS, tuple) and callable(TRANSIENT_ERRORS)
    assert ConnectionError in TRANSIENT_ERRORS and TimeoutError in TRANSIENT_ERRORS
    try:
        raise ConnectionResetError()
    except TRANSIENT_ERRORS:  # type: ignore[misc]  # mypy wants a plain tuple: tuple(TRANSIENT_ERRORS)
        pass
    assert transient_errors() == TRANSIENT_ERRORS and hash(TRANSIENT_ERRORS) == hash(transient_errors())
    assert tuple(TRANSIENT_ERRORS) != TRANSIENT_ERRORS
    assert pickle.loads(pickle.dumps(TRANSIENT_ERRORS)) == TRANSIENT_ERRORS
    assert repr(TRANSIENT_ERRORS) == "TRANSIENT_ERRORS"
    mine = TransientErrors((KeyError,), by_status=(ValueError,))
    assert mine(KeyError()) and not mine(ValueError())


def test_a_retry_policy_uses_the_whole_rule(server: str) -> None:
    requests = pytest.importorskip("requests")
    error = _raised(lambda: requests.get(f"{server}/503", timeout=5).raise_for_status())
    assert matches(rt.RetryPolicy().retry_on, error)
    assert not matches(rt.RetryPolicy(retry_on=(ConnectionError, TimeoutError)).retry_on, error)
