"""A deliberately flaky payments service on loopback, and a stdlib client for it.

The demo needs a downstream that fails often enough for retries to matter, and that
keeps score honestly: it applies each order's charge at most once and enforces fencing
tokens, so ``GET /stats`` shows whether any retry or duplicate message charged twice.

Endpoints (JSON in and out):

- ``POST /charge`` ``{order_id, amount, token}``: 503 with probability ``failure_rate``
  or while the service is down (nothing applied); 409 if ``token`` is lower than the
  highest token already processed for that order (a stale writer); else the charge is
  applied once per ``order_id`` and a repeat is answered with the original charge and
  ``"duplicate": true``.
- ``GET /rate/<currency>``: today's exchange rate to USD (``{currency, rate, as_of}``),
  failing like ``/charge`` (503 at ``failure_rate``, always while down).
- ``GET /stats``: calls, failures_injected, refused_down, applied, duplicates_rejected,
  stale_token_rejected, rate_calls, rate_failures, failure_rate, down. ``calls`` and the
  counters after it up to ``stale_token_rejected`` are about ``/charge``.
- ``GET /charges``: ``{"charges": {order_id: n}}``, n being the charge requests the
  service accepted for that order (applied or answered as a duplicate): a service that did
  not deduplicate would have charged the order n times.
- ``POST /config`` ``{failure_rate, down}`` (either or both): change them at runtime;
  ``down: true`` answers every ``/charge`` and ``/rate`` with 503, as a dead service would.
- ``GET /health``: 200 once the server listens.

Run it alone with ``python -m examples.downstream --port 8099 --failure-rate 0.2``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FX_BASE",
    "DownstreamError",
    "DownstreamUnavailable",
    "Ledger",
    "StaleToken",
    "charge",
    "charges",
    "rate",
    "set_down",
    "set_failure_rate",
    "start_downstream",
    "stats",
]

DEFAULT_FAILURE_RATE = 0.2
#: Units of each currency per US dollar; ``/rate`` drifts around these by a few tenths of
#: a percent, so a stale rate differs from a fresh one.
FX_BASE = {"EUR": 0.92, "GBP": 0.79, "JPY": 151.3, "CHF": 0.88, "CAD": 1.36, "SEK": 10.4}


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
        self.down = False
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._charged: dict[str, int] = {}
        self._accepted: dict[str, int] = {}  # charge requests accepted per order
        self._tokens: dict[str, int] = {}
        self.counts = dict.fromkeys(
            ("calls", "failures_injected", "refused_down", "applied", "duplicates_rejected",
             "stale_token_rejected", "rate_calls", "rate_failures"),
            0,
        )

    def _refuses(self) -> str | None:
        """Why this call fails with 503 (down, or the injected failure rate); else None."""
        if self.down:
            return "service down"
        if self._random.random() < self.failure_rate:
            return "injected failure"
        return None

    def charge(self, order_id: str, amount: int, token: int) -> tuple[int, dict[str, Any]]:
        """Apply one charge; returns (HTTP status, body)."""
        with self._lock:
            self.counts["calls"] += 1
            refused = self._refuses()
            if refused is not None:
                self.counts["refused_down" if self.down else "failures_injected"] += 1
                return 503, {"error": refused, "order_id": order_id}
            highest = self._tokens.get(order_id, 0)
            if token < highest:
                self.counts["stale_token_rejected"] += 1
                return 409, {"error": "stale fencing token", "token": token, "highest": highest}
            self._tokens[order_id] = token
            self._accepted[order_id] = self._accepted.get(order_id, 0) + 1
            if order_id in self._charged:
                self.counts["duplicates_rejected"] += 1
                return 200, {"order_id": order_id, "charged": self._charged[order_id], "duplicate": True}
            self._charged[order_id] = amount
            self.counts["applied"] += 1
            return 200, {"order_id": order_id, "charged": amount, "duplicate": False}

    def rate(self, currency: str) -> tuple[int, dict[str, Any]]:
        """Today's rate of ``currency`` to USD; returns (HTTP status, body)."""
        with self._lock:
            self.counts["rate_calls"] += 1
            if currency not in FX_BASE:
                return 404, {"error": f"unknown currency {currency!r}"}
            refused = self._refuses()
            if refused is not None:
                self.counts["rate_failures"] += 1
                return 503, {"error": refused, "currency": currency}
        now = time.time()
        drift = 1 + 0.004 * math.sin(now / 7) + 0.002 * math.sin(now / 1.3)
        return 200, {"currency": currency, "rate": round(FX_BASE[currency] * drift, 6), "as_of": now}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "failure_rate": self.failure_rate, "down": self.down}

    def charges(self) -> dict[str, int]:
        with self._lock:
            return dict(self._accepted)

    def configure(self, failure_rate: Any = None, down: Any = None) -> None:
        rate = None if failure_rate is None else _rate(failure_rate)
        if down is not None and not isinstance(down, bool):
            raise ValueError(f"down must be true or false, got {down!r}")
        with self._lock:
            if rate is not None:
                self.failure_rate = rate
            if down is not None:
                self.down = down


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"failure_rate must be a number in [0, 1], got {value!r}")
    return float(value)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._reply(200, self.server.ledger.snapshot())
        elif self.path.startswith("/rate/"):
            self._reply(*self.server.ledger.rate(self.path[len("/rate/"):]))
        elif self.path == "/charges":
            self._reply(200, {"charges": self.server.ledger.charges()})
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
                if "failure_rate" not in body and "down" not in body:
                    raise ValueError("give failure_rate, down or both")
                self.server.ledger.configure(body.get("failure_rate"), body.get("down"))
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


def rate(base_url: str, currency: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /rate/<currency>; raises ``DownstreamUnavailable`` while the service fails."""
    return _call(f"{base_url}/rate/{currency}", None, timeout)


def stats(base_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /stats."""
    return _call(f"{base_url}/stats", None, timeout)


def charges(base_url: str, timeout: float = 10.0) -> dict[str, int]:
    """GET /charges: the charge requests accepted per order id."""
    found: dict[str, int] = _call(f"{base_url}/charges", None, timeout)["charges"]
    return found


def set_failure_rate(base_url: str, failure_rate: float, timeout: float = 5.0) -> dict[str, Any]:
    """POST /config: the fraction of calls that fail from now on."""
    return _call(f"{base_url}/config", {"failure_rate": failure_rate}, timeout)


def set_down(base_url: str, down: bool, timeout: float = 5.0) -> dict[str, Any]:
    """POST /config: take the service down (every call 503) or bring it back."""
    return _call(f"{base_url}/config", {"down": down}, timeout)


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
