"""``MemoryStore``: the store's operations in one process, with the scripts' semantics.

It is the twin of the Lua scripts in ``lua/`` (the contract suite and a Hypothesis
model test hold them to the same answers), and what a worker uses for its breakers while
Redis is unreachable (fail-open). Each operation below mirrors its script step by step,
so a change to one is a change to both.

Times as in Redis: an op's ``now_ms`` (0 = this store's clock) drives leases, windows and
ages; TTLs run on the store's clock, and an expired record is gone.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .numbers import BreakerNumbers, breaker_numbers
from .protocol import (
    BREAKER_TTL_MS,
    Admission,
    Admit,
    BreakerView,
    CacheEntry,
    CacheGet,
    CachePut,
    Claim,
    ClaimAnswer,
    Complete,
    CompleteAnswer,
    Forget,
    Op,
    Record,
    Recorded,
    Release,
    Renew,
    SpendAnswer,
    SpendRetry,
    Switch,
    SwitchAnswer,
)

__all__ = ["MemoryStore"]

#: Expired records are swept out after this many batches (reads skip them meanwhile).
SWEEP_EVERY = 1024
_FOREVER = math.inf


@dataclass(slots=True)
class _Idem:
    expires_at: float = _FOREVER
    state: str | None = None
    owner: str | None = None
    fp: str = ""
    token: int = 0
    life: int = 0  # the ttl (ms) kept after the lease: the lease left is the life left - life
    task_id: str = ""
    result: str | None = None


@dataclass(slots=True)
class _Slot:
    """One bucket of the sliding window (the hash's t/c/f/s/a/r fields of one slot)."""

    t: int | None = None
    c: int = 0
    f: int = 0
    s: int = 0
    a: int = 0
    r: int = 0


@dataclass(slots=True)
class _Breaker:
    expires_at: float = _FOREVER
    name: str | None = None
    state: str | None = None
    changed_at: int = 0
    consec: int = 0
    open_until: int | None = None
    opened_at: int | None = None
    open_count: int = 0
    ho_ok: int = 0
    switch: str | None = None
    file_switch: str | None = None
    switched_at: int | None = None
    transitions: int = 0
    opens: int = 0
    trips: int = 0
    window_ms: int | None = None
    nb: int | None = None
    lf: int = -1
    ls: int = -1
    budget: tuple[float, int] | None = None
    probes: dict[str, int] = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)

    def touch(self, idx: int, slot: int) -> _Slot:
        """The slot for interval ``idx``, emptied first if it holds an older one."""
        bucket = self.slots.get(slot)
        if bucket is None:
            bucket = self.slots[slot] = _Slot()
        if bucket.t != idx:
            bucket.t, bucket.c, bucket.f, bucket.s, bucket.a, bucket.r = idx, 0, 0, 0, 0, 0
        return bucket

    def window(self, idx: int, nb: int) -> list[_Slot]:
        """The slots among the first ``nb`` that hold an interval inside the window."""
        found = []
        for s in range(nb):
            bucket = self.slots.get(s)
            if bucket is not None and bucket.t is not None and bucket.t > idx - nb:
                found.append(bucket)
        return found

    def fields(self) -> dict[str, str]:
        """The record as the Redis hash holds it (what ``status`` shows)."""
        out: dict[str, str] = {}
        scalars = (
            "name", "state", "changed_at", "open_until", "opened_at", "switch", "file_switch",
            "switched_at", "window_ms", "nb",
        )  # fmt: skip
        for name in scalars:
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        counters = ("consec", "open_count", "ho_ok", "transitions", "opens", "trips")
        for name in counters:
            if getattr(self, name):
                out[name] = str(getattr(self, name))
        if self.lf >= 0:
            out["lf"] = str(self.lf)
        if self.ls >= 0:
            out["ls"] = str(self.ls)
        if self.budget is not None:
            out["budget_ratio"], out["budget_min"] = repr(self.budget[0]), str(self.budget[1])
        for owner, expiry in self.probes.items():
            out[f"p:{owner}"] = str(expiry)
        for s, bucket in self.slots.items():
            if bucket.t is not None:
                out.update({f"t{s}": str(bucket.t), f"c{s}": str(bucket.c), f"f{s}": str(bucket.f),
                            f"s{s}": str(bucket.s)})  # fmt: skip
            out.update({f"a{s}": str(bucket.a), f"r{s}": str(bucket.r)})
        return out


@dataclass(slots=True)
class _Cache:
    expires_at: float = _FOREVER
    kind: str | None = None
    value: str | None = None
    written_at: int | None = None
    fail_value: str | None = None
    fail_until: int | None = None


_STORES: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    """A fork may copy a lock another thread held: a child starts with fresh ones."""
    for store in list(_STORES):
        store._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_after_fork)


def _bucket_of(now: int, window_ms: int, nb: int) -> tuple[int, int]:
    idx = now // max(1, window_ms // nb)
    return idx, idx % nb


class MemoryStore:
    """Shared state for the threads of one process (one lock; a batch is atomic)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._idem: dict[str, _Idem] = {}
        self._cache: dict[str, _Cache] = {}
        self._breakers: dict[str, _Breaker] = {}
        self._batches = 0
        #: Batches run so far (a batch is this store's "round trip").
        self.trips = 0
        self._run: dict[type, Callable[[Any, int, float], Any]] = {
            Claim: self._claim,
            Complete: self._complete,
            Release: self._release,
            Renew: self._renew,
            Forget: self._forget,
            Admit: self._admit,
            Record: self._record,
            SpendRetry: self._spend_retry,
            Switch: self._switch,
            CacheGet: self._cache_get,
            CachePut: self._cache_put,
        }
        _STORES.add(self)

    # -- the Store protocol ---------------------------------------------------------------

    def batch(self, ops: Sequence[Op]) -> list[Any]:
        if not ops:
            return []
        with self._lock:
            self.trips += 1
            real = self._clock() * 1000.0
            clock = int(real)
            answers = [self._run[type(op)](op, clock, real) for op in ops]
            self._batches += 1
            if self._batches % SWEEP_EVERY == 0:
                self._sweep(real)
            return answers

    def breakers(self) -> list[BreakerView]:
        with self._lock:
            real = self._clock() * 1000.0
            views = [
                BreakerView(rec.name or "", rec.fields())
                for rec in self._breakers.values()
                if rec.expires_at > real
            ]
        return sorted(views, key=lambda view: view.downstream)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def ping(self) -> None:
        """Always answers: it is in this process."""

    def warm(self) -> None:
        """Nothing to prepare."""

    def close(self) -> None:
        """Nothing to release (the records stay readable)."""

    # -- records ----------------------------------------------------------------------------

    @staticmethod
    def _live(table: dict[str, Any], key: str, real: float) -> Any:
        rec = table.get(key)
        if rec is not None and rec.expires_at <= real:
            del table[key]
            return None
        return rec

    def _sweep(self, real: float) -> None:
        for table in (self._idem, self._cache, self._breakers):
            for key in [k for k, rec in table.items() if rec.expires_at <= real]:
                del table[key]

    # -- idempotency (claim.lua, complete.lua, release.lua, renew.lua, forget.lua) ---------

    def _claim(self, op: Claim, clock: int, real: float) -> ClaimAnswer:
        rec: _Idem | None = self._live(self._idem, op.record, real)
        token = rec.token if rec is not None else 0
        if rec is not None and rec.state in ("done", "in_flight"):
            if op.fingerprint and rec.fp and rec.fp != op.fingerprint:
                return ClaimAnswer("conflict", token)
            if rec.state == "done":
                return ClaimAnswer("done", token, rec.result)
            # the lease is the record's expiry (as in claim.lua): real time, whatever the clock
            remaining = math.ceil(rec.expires_at - real - rec.life)
            if remaining > 0 and not (op.handoff and rec.owner == op.handoff):
                return ClaimAnswer("in_flight", token, remaining_ms=remaining)
        if op.peek:
            return ClaimAnswer("free", token)
        if rec is None:
            rec = self._idem[op.record] = _Idem()
        rec.token += 1
        rec.state, rec.owner, rec.fp = "in_flight", op.owner, op.fingerprint
        rec.life, rec.task_id, rec.result = op.ttl_ms, op.task_id, None
        rec.expires_at = real + op.lease_ms + op.ttl_ms
        return ClaimAnswer("claimed", rec.token)

    def _owned(self, record: str, owner: str, token: int, real: float) -> tuple[_Idem | None, bool]:
        rec: _Idem | None = self._live(self._idem, record, real)
        ours = rec is not None and rec.state == "in_flight" and rec.owner == owner and rec.token == token
        return rec, ours

    def _complete(self, op: Complete, clock: int, real: float) -> CompleteAnswer:
        rec, ours = self._owned(op.record, op.owner, op.token, real)
        if rec is None:
            return CompleteAnswer(False, "", None)
        if not ours:
            return CompleteAnswer(False, rec.state or "", rec.result)
        rec.state, rec.result = "done", op.result
        if op.refresh:
            rec.expires_at = real + op.ttl_ms
        return CompleteAnswer(True)

    def _release(self, op: Release, clock: int, real: float) -> bool:
        rec, ours = self._owned(op.record, op.owner, op.token, real)
        if rec is None or not ours:
            return False
        rec.state = "released"  # (owner and life stay, as in the script: read only in flight)
        rec.expires_at = real + op.ttl_ms
        return True

    def _renew(self, op: Renew, clock: int, real: float) -> bool:
        rec, ours = self._owned(op.record, op.owner, op.token, real)
        if rec is None or not ours:
            return False
        rec.expires_at = real + op.lease_ms + (rec.life or op.ttl_ms)
        return True

    def _forget(self, op: Forget, clock: int, real: float) -> bool:
        if self._live(self._idem, op.record, real) is None:
            return False
        del self._idem[op.record]
        return True

    # -- breakers and retry budgets (admit.lua, record.lua, spend_retry.lua, switch.lua) ----

    def _breaker(self, name: str, real: float) -> _Breaker:
        rec: _Breaker | None = self._live(self._breakers, name, real)
        if rec is None:
            rec = self._breakers[name] = _Breaker()
        return rec

    def _admit(self, op: Admit, clock: int, real: float) -> Admission:
        now = op.now_ms or clock
        n = breaker_numbers(op.policy)
        rec = self._breaker(op.downstream, real)
        state = rec.state or "closed"
        consec, switch = rec.consec, rec.switch or "normal"
        if rec.state is None:
            rec.name, rec.state, rec.changed_at = op.downstream, "closed", now
            rec.expires_at = real + n.ttl_ms
        if switch in ("breaker_disabled", "forced_closed"):
            return Admission("allow", state, 0, consec, switch)
        if switch in ("forced_open", "fallback_only", "reject"):
            return Admission("reject", state, n.probe_lease_ms, consec, switch)
        if state == "open":
            open_until = rec.open_until or 0
            if now < open_until:
                return Admission("reject", state, open_until - now, consec, switch)
            state = rec.state = "half_open"
            rec.changed_at, rec.ho_ok = now, 0
            rec.transitions += 1
            rec.expires_at = real + n.ttl_ms
        if state == "half_open":
            for owner in [o for o, expiry in rec.probes.items() if expiry <= now]:
                del rec.probes[owner]
            if len(rec.probes) < n.half_open_probes:
                rec.probes[op.owner] = now + n.probe_lease_ms
                return Admission("probe", state, 0, consec, switch)
            soonest = min(rec.probes.values(), default=now)
            return Admission("reject", state, soonest - now, consec, switch)
        return Admission("allow", state, 0, consec, switch)

    def _open(self, rec: _Breaker, n: BreakerNumbers, now: int, open_count: int) -> None:
        span = n.open_for_ms
        if n.open_for_max_ms > 0:
            span = min(n.open_for_max_ms, n.open_for_ms * 2**open_count)
        rec.probes.clear()
        rec.state, rec.opened_at, rec.open_until, rec.changed_at = "open", now, now + span, now
        rec.open_count = open_count + 1
        rec.transitions += 1
        rec.opens += 1

    def _record(self, op: Record, clock: int, real: float) -> Recorded:
        now = op.now_ms or clock
        n = breaker_numbers(op.policy)
        rec = self._breaker(op.downstream, real)
        state = rec.state or "closed"
        consec, open_count, switch = rec.consec, rec.open_count, rec.switch or "normal"
        # the TTL is renewed when the record is created, a bucket's interval starts or the
        # breaker moves (as the script does: not on every call)
        renew = rec.state is None
        if rec.state is None:
            rec.name, rec.state, rec.changed_at = op.downstream, "closed", now
        if op.probe:
            rec.probes.pop(op.owner, None)
        calls = op.ok + op.fail + op.slow + op.slowfail
        transitioned = False
        if calls > 0 or op.first_attempts > 0:
            idx, slot = _bucket_of(now, n.window_ms, n.buckets)
            held = rec.slots.get(slot)
            if held is None or held.t != idx:
                renew = True
            bucket = rec.touch(idx, slot)
            failed_n, slow_n = op.fail + op.slowfail, op.slow + op.slowfail
            bucket.c += calls
            bucket.f += failed_n
            bucket.s += slow_n
            bucket.a += op.first_attempts
            if calls > 0:
                consec = failed_n if op.ok + op.slow > 0 else consec + failed_n
                rec.consec, rec.window_ms, rec.nb = consec, n.window_ms, n.buckets
                if failed_n > 0:
                    rec.lf = max(rec.lf, idx)
                if slow_n > 0:
                    rec.ls = max(rec.ls, idx)
                if switch in ("breaker_disabled", "forced_open", "forced_closed"):
                    pass  # an operator holds the state: count, but make no transition
                elif state == "half_open" and op.probe:
                    if failed_n > 0 or slow_n > 0:
                        self._open(rec, n, now, open_count)
                        state, transitioned = "open", True
                    else:
                        rec.ho_ok += 1
                        if rec.ho_ok >= n.half_open_probes:
                            for s in range(n.buckets):
                                held = rec.slots.get(s)
                                if held is not None:
                                    held.t, held.c, held.f, held.s = None, 0, 0, 0
                            rec.state, rec.changed_at, rec.open_count, rec.ho_ok = "closed", now, 0, 0
                            rec.transitions += 1
                            state, transitioned = "closed", True
                elif state == "closed":
                    window = rec.window(idx, n.buckets)
                    w_calls = sum(b.c for b in window)
                    w_fails = sum(b.f for b in window)
                    w_slows = sum(b.s for b in window)
                    trip = w_calls >= n.min_calls and w_fails / w_calls >= n.failure_rate
                    if n.consecutive_failures > 0 and consec >= n.consecutive_failures:
                        trip = True
                    slow_calls = n.slow_call_rate > 0 and w_calls >= n.min_calls
                    if slow_calls and w_slows / w_calls >= n.slow_call_rate:
                        trip = True
                    if trip:
                        self._open(rec, n, now, open_count)
                        rec.trips += 1
                        state, transitioned = "open", True
        if renew or transitioned:
            rec.expires_at = real + n.ttl_ms
        return Recorded(state, transitioned, consec, switch)

    def _spend_retry(self, op: SpendRetry, clock: int, real: float) -> SpendAnswer:
        now = op.now_ms or clock
        n = breaker_numbers(op.policy)
        rec = self._breaker(op.downstream, real)
        rec.name = op.downstream
        rec.budget = (float(op.budget.ratio), int(op.budget.min_per_window))
        idx, slot = _bucket_of(now, n.window_ms, n.buckets)
        window = rec.window(idx, n.buckets)
        attempts = sum(b.a for b in window)
        retries = sum(b.r for b in window)
        rec.expires_at = real + n.ttl_ms
        if retries + 1 > float(op.budget.ratio) * attempts + op.budget.min_per_window:
            return SpendAnswer(False, retries, attempts)
        rec.touch(idx, slot).r += 1
        return SpendAnswer(True, retries + 1, attempts)

    def _switch(self, op: Switch, clock: int, real: float) -> SwitchAnswer:
        rec: _Breaker | None = self._live(self._breakers, op.downstream, real)
        previous = (rec.switch if rec is not None else None) or "normal"
        file_switch = rec.file_switch if rec is not None else None
        if op.source == "file":
            if file_switch == op.mode:
                return SwitchAnswer(previous, False)
            file_switch = op.mode
        now = op.now_ms or clock
        if op.mode == "reset" or rec is None:
            rec = self._breakers[op.downstream] = _Breaker()
        if op.mode == "reset":
            rec.name, rec.state, rec.changed_at = op.downstream, "closed", now
        elif op.mode == "close":
            rec.probes.clear()
            rec.name, rec.switch, rec.state, rec.changed_at = op.downstream, "normal", "closed", now
            rec.open_count = rec.ho_ok = rec.consec = 0
            rec.switched_at = now
            rec.transitions += 1
        else:
            rec.name, rec.switch, rec.switched_at = op.downstream, op.mode, now
            if rec.state is None:
                rec.state, rec.changed_at = "closed", now
        if file_switch is not None:
            rec.file_switch = file_switch
        rec.expires_at = real + BREAKER_TTL_MS
        return SwitchAnswer(previous, True)

    # -- fallback cache (cache_get.lua, cache_put.lua) -------------------------------------

    def _cache_get(self, op: CacheGet, clock: int, real: float) -> CacheEntry:
        rec: _Cache | None = self._live(self._cache, op.record, real)
        if rec is None:
            return CacheEntry()
        if rec.kind == "negative":
            return CacheEntry("negative", rec.value)
        now = op.now_ms or clock
        failure = rec.fail_value if rec.fail_until is not None and rec.fail_until > now else None
        good_age = -1
        if rec.kind == "ok":
            age = now - (rec.written_at or 0)
            good_age = max(0, age)
            if op.serve:
                allowed = max(op.floor_ms, math.floor(op.ttl_ms * float(op.decay) ** op.failures))
                if 0 < op.max_stale_ms < allowed:
                    allowed = op.max_stale_ms
                if age < allowed:
                    remaining = allowed - age
                    if remaining < rec.expires_at - real:
                        rec.expires_at = real + remaining
                    return CacheEntry("ok", rec.value, age, allowed, failure, good_age)
                good_age = -1  # too old to serve: dropped
                if failure is not None:
                    rec.kind = rec.value = rec.written_at = None  # the failure stays news
                else:
                    del self._cache[op.record]
        if failure is not None:
            return CacheEntry("failure", failure, good_age_ms=good_age)
        return CacheEntry(good_age_ms=good_age)

    def _cache_put(self, op: CachePut, clock: int, real: float) -> bool:
        now = op.now_ms or clock
        ttl = max(1, op.ttl_ms)
        if op.kind == "failure":
            rec: _Cache | None = self._live(self._cache, op.record, real)
            if rec is None:
                rec = self._cache[op.record] = _Cache(real + ttl)
            elif rec.expires_at - real < ttl:
                rec.expires_at = real + ttl
            rec.fail_value, rec.fail_until = op.value, now + ttl
            return True
        self._cache[op.record] = _Cache(real + ttl, op.kind, op.value, now)
        return True
