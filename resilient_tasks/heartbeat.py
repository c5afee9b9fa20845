"""Lease renewal for running claims: one daemon thread per worker process.

A claim's lease is renewed every ``lease / 3`` while the body runs, all due claims in one
round trip. A renewal that finds the claim gone marks it ``lost`` so the body can stop
before a side effect (``self.idempotency.check()``) and its completion is refused anyway.

The same thread delivers completions the ``end`` trip could not (the store was down when
a body finished): tried again until the lease ends, so a duplicate arriving after the
store is back replays the result instead of running the body a second time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import StoreUnavailable
from .guards.base import ClaimHandle
from .process import current_pid
from .store.protocol import Op, Renew, Store

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)


@dataclass
class _Lease:
    claim: ClaimHandle
    lease_ms: int
    ttl_ms: int
    due: float


@dataclass
class _Pending:
    ops: list[Op]
    until: float
    due: float


#: How often an undelivered completion is tried again.
REDELIVER_EVERY_S = 0.25


class Heartbeat:
    """Renews the leases of the claims this process holds."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store
        self._leases: dict[int, _Lease] = {}
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = -1
        self._thread: threading.Thread | None = None
        #: Until when the thread is taken to be alive without asking (a lock per look).
        self._alive_until = 0.0
        self._planned_wake = 0.0

    def track(self, claim: ClaimHandle, lease_ms: int, ttl_ms: int) -> None:
        self._ensure_thread()
        due = time.monotonic() + lease_ms / 3000.0
        with self._lock:
            self._leases[id(claim)] = _Lease(claim, lease_ms, ttl_ms, due)
            wake = due < self._planned_wake
        if wake:  # most claims end long before their first renewal: no thread hand-off
            self._wake.set()

    def hand_over(self, ops: list[Op], within_s: float) -> None:
        """Deliver ``ops`` (owner-checked writes: a late or repeated one is harmless) in
        the background, trying every 0.25 s for ``within_s`` seconds."""
        self._ensure_thread()
        now = time.monotonic()
        with self._lock:
            self._pending.append(_Pending(list(ops), now + within_s, now + REDELIVER_EVERY_S))
            wake = now + REDELIVER_EVERY_S < self._planned_wake
        if wake:
            self._wake.set()

    def pending(self) -> int:
        """Writes still waiting for the store."""
        with self._lock:
            return len(self._pending)

    def untrack(self, claim: ClaimHandle) -> None:
        with self._lock:
            self._leases.pop(id(claim), None)

    def _ensure_thread(self) -> None:
        now = time.monotonic()
        pid = current_pid()
        if self._pid == pid and now < self._alive_until:
            return
        with self._lock:
            if self._pid == pid and self._thread is not None and self._thread.is_alive():
                self._alive_until = now + 1.0
                return  # running (or another thread started it meanwhile)
            if self._pid != pid:  # forked: the parent's leases are not ours
                self._leases.clear()
                self._pending.clear()
            self._pid = pid
            self._thread = threading.Thread(target=self._loop, name="rt-heartbeat", daemon=True)
            self._thread.start()
            self._alive_until = now + 1.0

    def _loop(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [lease for lease in self._leases.values() if lease.due <= now]
                late = [p for p in self._pending if p.due <= now]
                upcoming = min(
                    [lease.due for lease in self._leases.values()] + [p.due for p in self._pending],
                    default=now + 1.0,
                )
                # set with the same look at the leases: a track() after this sees it
                self._planned_wake = 0.0 if due or late else upcoming
            if due:
                self._renew(due)
            if late:
                self._deliver(late)
            if due or late:
                continue
            self._wake.wait(timeout=max(0.01, upcoming - time.monotonic()))
            self._wake.clear()
            with self._lock:
                self._planned_wake = 0.0

    def _deliver(self, pending: list[_Pending]) -> None:
        ops = [op for p in pending for op in p.ops]
        try:
            self._store().batch(ops)
        except StoreUnavailable as exc:
            now = time.monotonic()  # after the attempt: a slow one must not make the next due now
            with self._lock:
                for p in pending:
                    if now >= p.until:
                        self._pending.remove(p)
                        log.error("gave up delivering %d completion writes: %s", len(p.ops), exc)
                    else:
                        p.due = now + REDELIVER_EVERY_S
            return
        with self._lock:
            for p in pending:
                self._pending.remove(p)
        log.warning("delivered %d completion writes late, after the store came back", len(ops))

    def _renew(self, leases: list[_Lease]) -> None:
        ops: list[Op] = [
            Renew(lease.claim.key, lease.claim.owner, lease.claim.token, lease.lease_ms, lease.ttl_ms)
            for lease in leases
        ]
        now = time.monotonic()
        try:
            results = self._store().batch(ops)
        except StoreUnavailable as exc:
            log.warning("lease renewal failed, will retry: %s", exc)
            with self._lock:
                for lease in leases:
                    lease.due = now + min(1.0, lease.lease_ms / 6000.0)
            return
        with self._lock:
            for lease, renewed in zip(leases, results, strict=True):
                if not renewed:
                    lease.claim.lost = True
                    self._leases.pop(id(lease.claim), None)
                    log.warning("idempotency claim token %s was lost", lease.claim.token)
                else:
                    lease.due = now + lease.lease_ms / 3000.0
