"""A process's view of one breaker, and the successes it has not sent yet.

Resilience4j counts in process; pybreaker shares state but writes on every call. This
is both: the fleet's state lives in the store, changed only by its scripts, and a
process writes a success only in a batch. In the closed state, with a view of the
breaker learned less than ``flush_interval`` ago, a call is admitted here (no round
trip) and its success is counted here; the sum goes to the store in one ``Record`` at
most every ``flush_interval`` (or when ``FLUSH_AT`` successes wait), in a round trip
the task makes anyway. A failure or a slow call is recorded at once, with the
successes waiting, so the store sees an outage as fast as with a write per call (the
failure rate it sees can only be too high by the successes not yet sent, never too
low). Every answer (an admission, a record) renews the view; half-open admission and
every transition stay in the store's scripts.

Bounds (documented in docs/RELIABILITY.md, tested in tests/unit/test_tally.py), with P
processes, C calls in flight per process, λ calls per second per process and F the
flush interval:

- a dead downstream (every call fails): each failure is recorded at once and its answer
  tells the process the breaker opened, so calls that reach it are at most
  T + P·C, T the calls the policy needs to trip (as with a write per call);
- a breaker opened by others while this process only sees successes: it learns at its
  next round trip to the breaker, at most F after its view was renewed, so it admits at
  most P·(C + λ·F) calls while the breaker is open.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FLUSH_AT", "Tally"]

#: Successes that make a process send them without waiting for the interval.
FLUSH_AT = 256


@dataclass
class _View:
    state: str = ""
    switch: str = "normal"
    consecutive_failures: int = 0
    learned: float = -1e18


class Tally:
    """One process's view of one breaker (thread-safe; a fork starts afresh)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._view = _View()
        self._ok = 0
        self._first = 0
        self._flushed = clock()

    def learn(self, state: str, switch: str, consecutive_failures: int) -> None:
        """What an answer of the store said of the breaker, now."""
        with self._lock:
            self._view = _View(state, switch, consecutive_failures, self._clock())

    def forget(self) -> None:
        """Drop the view (a switch flipped from this process): the next call asks."""
        with self._lock:
            self._view = _View()

    def admits(self, interval: float) -> _View | None:
        """The view when a call may be admitted here: closed, no switch, learned within
        ``interval``; else None (ask the store)."""
        with self._lock:
            view = self._view
            fresh = self._clock() - view.learned < interval
            return view if fresh and view.state == "closed" and view.switch == "normal" else None

    def add(self, first_attempt: bool) -> None:
        """One success admitted here, to send later."""
        with self._lock:
            self._ok += 1
            self._first += int(first_attempt)

    def due(self, interval: float) -> bool:
        with self._lock:
            return self._ok > 0 and (self._ok >= FLUSH_AT or self._clock() - self._flushed >= interval)

    def take(self) -> tuple[int, int]:
        """The successes (and first attempts among them) waiting, handed to one record."""
        with self._lock:
            taken = (self._ok, self._first)
            self._ok = self._first = 0
            self._flushed = self._clock()
            return taken

    def give_back(self, ok: int, first: int) -> None:
        """A record that did not reach the store: its successes wait for the next one."""
        with self._lock:
            self._ok += ok
            self._first += first
