"""A deliberately flaky payments service on loopback, and a stdlib client for it.

The demo needs a downstream that fails often enough for retries to matter, and that
keeps score honestly: it applies each order's charge at most once and enforces fencing
tokens, so ``GET /stats`` shows whether any retry or duplicate message charged twice.

Endpoints (JSON in and out):

- ``POST /charge`` ``{order_id, amount, token}``: 503 with probability ``failure_rate``
  (nothing applied); 409 if ``token`` is lower than the highest token already processed
  for that order (a stale writer); else the charge is applied once per ``order_id`` and a
  repeat is answered with the original charge and ``"duplicate": true``.
- ``GET /stats``: calls, failures_injected, applied, duplicates_rejected,
  stale_token_rejected, failure_rate.
- ``POST /config`` ``{failure_rate}``: change the failure rate at runtime.
- ``GET /health``: 200 once the server listens.

Run it alone with ``python -m examples.downstream --port 8099 --failure-rate 0.2``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "DownstreamError",
    "DownstreamUnavailable",
    "Ledger",
    "StaleToken",
    "charge",
    "set_failure_rate",
    "start_downstream",
    "stats",
]

DEFAULT_FAILURE_RATE = 0.2


class DownstreamError(Exception):
    """The payments service refused the request (not worth retrying)."""


class DownstreamUnavailable(ConnectionError):
    """503 or no connection: a ``ConnectionError`` so a retry policy's ``retry_on`` picks it."""


class StaleToken(DownstreamError):
    """409: a newer execution already wrote for this order; this writer is a zombie."""


class Ledger:
    """The service's state: what was charged, the fencing tokens, and the counters."""

    def __init__(self, failure_rate: float = DEFAULT_FAILURE_RATE, seed: int | None = None):
        self.failure_rate = _rate(failure_rate)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._charged: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self.counts = dict.fromkeys(
            ("calls", "failures_injected", "applied", "duplicates_rejected", "stale_token_rejected"),
            0,
        )

    def charge(self, order_id: str, amount: int, token: int) -> tuple[int, dict[str, Any]]:
        """Apply one charge; returns (HTTP status, body)."""
        with self._lock:
            self.counts["calls"] += 1
            if self._random.random() < self.failure_rate:
                self.counts["failures_injected"] += 1
                return 503, {"error": "injected failure", "order_id": order_id}
            highest = self._tokens.get(order_id, 0)
            if token < highest:
                self.counts["stale_token_rejected"] += 1
                return 409, {"error": "stale fencing token", "token": token, "highest": highest}
            self._tokens[order_id] = token
            if order_id in self._charged:
                self.counts["duplicates_rejected"] += 1
                return 200, {"order_id": order_id, "charged": self._charged[order_id], "duplicate": True}
            self._charged[order_id] = amount
            self.counts["applied"] += 1
            return 200, {"order_id": order_id, "charged": amount, "duplicate": False}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "failure_rate": self.failure_rate}

    def configure(self, failure_rate: Any) -> None:
        rate = _rate(failure_rate)
        with self._lock:
            self.failure_rate = rate


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"failure_rate must be a number in [0, 1], got {value!r}")
    return float(value)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._reply(200, self.server.ledger.snapshot())
        elif self.path == "/health":
            self._reply(200, {"ok": True})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self.path == "/charge":
                order_id, amount, token = body["order_id"], body["amount"], body["token"]
                if not isinstance(order_id, str) or not isinstance(amount, int) or not isinstance(token, int):
                    raise ValueError("order_id must be a string, amount and token integers")
                self._reply(*self.server.ledger.charge(order_id, amount, token))
            elif self.path == "/config":
                self.server.ledger.configure(body["failure_rate"])
                self._reply(200, self.server.ledger.snapshot())
            else:
                self._reply(404, {"error": f"no route {self.path}"})
        except (KeyError, ValueError, TypeError) as exc:
            self._reply(400, {"error": f"bad request: {exc}"})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def _reply(self, status: int, body: Mapping[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: thousands of requests a second would drown the demo's output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # 16 worker threads connect at once; the default backlog of 5 drops SYNs, and each
    # dropped SYN costs the client a one-second retransmit.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], ledger: Ledger) -> None:
        self.ledger = ledger
        super().__init__(address, _Handler)


def start_downstream(
    port: int = 0, failure_rate: float = DEFAULT_FAILURE_RATE, *, host: str = "127.0.0.1",
    seed: int | None = None,
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve in a daemon thread; ``server.server_address`` has the port (0 picks a free one).

    Stop it with ``server.shutdown(); server.server_close()``.
    """
    server = _Server((host, port), Ledger(failure_rate, seed))
    thread = threading.Thread(target=server.serve_forever, name="downstream", daemon=True)
    thread.start()
    return server, thread


# -- client (stdlib only, so workers need nothing extra) ---------------------------------


def _call(url: str, data: Mapping[str, Any] | None, timeout: float) -> dict[str, Any]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(
        url, data=body, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        if exc.code == 503:
            raise DownstreamUnavailable(f"{url}: 503 {detail}") from None
        if exc.code == 409:
            raise StaleToken(f"{url}: 409 {detail}") from None
        raise DownstreamError(f"{url}: {exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        # Refused, reset or timed out before any HTTP answer: the service is unreachable.
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise TimeoutError(f"{url}: {exc.reason}") from None
        raise DownstreamUnavailable(f"{url}: {exc.reason}") from None
    except ConnectionError as exc:
        raise DownstreamUnavailable(f"{url}: {exc}") from None


def charge(base_url: str, order_id: str, amount: int, token: int, timeout: float = 5.0) -> dict[str, Any]:
    """POST /charge; raises ``DownstreamUnavailable`` (retry) or ``DownstreamError`` (don't)."""
    return _call(f"{base_url}/charge", {"order_id": order_id, "amount": amount, "token": token}, timeout)


def stats(base_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /stats."""
    return _call(f"{base_url}/stats", None, timeout)


def set_failure_rate(base_url: str, failure_rate: float, timeout: float = 5.0) -> dict[str, Any]:
    """POST /config: the fraction of calls that fail from now on."""
    return _call(f"{base_url}/config", {"failure_rate": failure_rate}, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.downstream", description="A flaky payments service on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--failure-rate", type=float, default=DEFAULT_FAILURE_RATE)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    server = _Server((args.host, args.port), Ledger(args.failure_rate, args.seed))
    # SIGTERM ends serve_forever from another thread (shutdown() blocks in the serving one).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    url = f"http://{args.host}:{server.server_port}"
    print(f"downstream listening on {url} (failure rate {args.failure_rate})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
