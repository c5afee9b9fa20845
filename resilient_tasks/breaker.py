"""Circuit breaker semantics: the ops sent to Redis, and the same machine in memory.

The fleet-wide breaker lives in one Redis hash per downstream, changed only by the
``admit``/``record``/``spend_retry`` scripts. ``LocalBreaker`` is the same state machine
in Python: it stands in (fail-open) while Redis is unreachable, and it is the model the
scripts are checked against in the property tests.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .keys import digest
from .memo import PerObject
from .policy import BreakerPolicy, RetryBudget
from .store.base import Op, Store, as_text

__all__ = [
    "Admission",
    "LocalBreaker",
    "admit_op",
    "breaker_key",
    "parse_admission",
    "record_op",
    "spend_retry_op",
]

#: Breaker hashes live a day past their last write (operators read them in ``status``).
BREAKER_TTL_MS = 86_400_000
OUTCOMES = ("ok", "fail", "slow", "slowfail", "none")


def breaker_key(store: Store, name: str) -> str:
    """``prefix:brk:{sha256(name)}``: the name is stored inside, never in the key."""
    return store.key("brk", _breaker_tag(name))


@functools.lru_cache(maxsize=4096)
def _breaker_tag(name: str) -> str:
    """Hashed once per name: a task names the same few downstreams on every call."""
    return digest("breaker", name)[:40]


def probe_lease_ms(policy: BreakerPolicy) -> int:
    """How long a half-open probe may take before its lease frees the slot."""
    return int(max(1.0, min(policy.open_for, 60.0)) * 1000)


def _ttl_ms(policy: BreakerPolicy) -> int:
    return max(BREAKER_TTL_MS, int(policy.window * 4000))


def _work_out_tail(policy: BreakerPolicy, name: str, script: str) -> tuple[Any, ...]:
    """The arguments of ``script`` that depend only on the policy and the name."""
    if script == "admit":
        return (probe_lease_ms(policy), policy.half_open_probes, name, _ttl_ms(policy))
    return (
        policy.failure_rate,
        policy.min_calls,
        int(policy.window * 1000),
        policy.buckets,
        policy.consecutive_failures or 0,
        policy.slow_call_rate or 0,
        int(policy.open_for * 1000),
        int((policy.open_for_max or 0) * 1000),
        policy.half_open_probes,
        name,
        _ttl_ms(policy),
    )


_tail = PerObject(_work_out_tail)


def admit_op(store: Store, name: str, policy: BreakerPolicy, owner: str, now_ms: int = 0) -> Op:
    return Op("admit", (breaker_key(store, name),), (now_ms, owner, *_tail(policy, name, "admit")))


def record_op(
    store: Store,
    name: str,
    policy: BreakerPolicy,
    owner: str,
    outcome: str,
    *,
    probe: bool,
    first_attempt: bool,
    now_ms: int = 0,
) -> Op:
    return Op(
        "record",
        (breaker_key(store, name),),
        (now_ms, owner, outcome, int(probe), int(first_attempt), *_tail(policy, name, "record")),
    )


def spend_retry_op(
    store: Store, name: str, policy: BreakerPolicy, budget: RetryBudget, now_ms: int = 0
) -> Op:
    return Op(
        "spend_retry",
        (breaker_key(store, name),),
        (
            now_ms,
            budget.ratio,
            budget.min_per_window,
            int(policy.window * 1000),
            policy.buckets,
            _ttl_ms(policy),
        ),
    )


class Admission(NamedTuple):
    """The breaker's answer before a call (immutable; a tuple, built on every call)."""

    verdict: str  # allow | probe | reject
    state: str
    retry_after: float
    consecutive_failures: int
    switch: str = "normal"

    @property
    def allowed(self) -> bool:
        return self.verdict != "reject"

    @property
    def probe(self) -> bool:
        return self.verdict == "probe"


def parse_admission(answer: list[Any]) -> Admission:
    return Admission(
        verdict=as_text(answer[0]),
        state=as_text(answer[1]),
        retry_after=int(answer[2]) / 1000.0,
        consecutive_failures=int(answer[3]),
        switch=as_text(answer[4]) if len(answer) > 4 else "normal",
    )


def outcome_of(policy: BreakerPolicy, failed: bool, duration: float | None) -> str:
    """``ok``/``fail``, with ``slow`` when the call took at least ``slow_call`` seconds."""
    slow = policy.slow_call is not None and duration is not None and duration >= policy.slow_call
    if slow:
        return "slowfail" if failed else "slow"
    return "fail" if failed else "ok"


@dataclass
class _Slot:
    index: int = -1
    calls: int = 0
    fails: int = 0
    slows: int = 0
    attempts: int = 0
    retries: int = 0


@dataclass
class LocalBreaker:
    """The breaker state machine in one process (the scripts' twin; times in ms)."""

    policy: BreakerPolicy
    state: str = "closed"
    open_until: int = 0
    consec: int = 0
    open_count: int = 0
    ho_ok: int = 0
    transitions: int = 0
    probes: dict[str, int] = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def admit(self, owner: str, now: int) -> Admission:
        with self.lock:  # a thread pool's tasks share one local breaker
            return self._admit(owner, now)

    def _admit(self, owner: str, now: int) -> Admission:
        lease = probe_lease_ms(self.policy)
        if self.state == "open":
            if now < self.open_until:
                return Admission("reject", "open", (self.open_until - now) / 1000, self.consec)
            self.state, self.ho_ok = "half_open", 0
            self.transitions += 1
        if self.state == "half_open":
            self.probes = {k: v for k, v in self.probes.items() if v > now}
            if len(self.probes) < self.policy.half_open_probes:
                self.probes[owner] = now + lease
                return Admission("probe", "half_open", 0.0, self.consec)
            soonest = min(self.probes.values(), default=now)
            return Admission("reject", "half_open", (soonest - now) / 1000, self.consec)
        return Admission("allow", self.state, 0.0, self.consec)

    def _slot(self, now: int) -> tuple[int, _Slot]:
        bucket_ms = max(1, math.floor(self.policy.window * 1000 / self.policy.buckets))
        index = now // bucket_ms
        slot = self.slots.setdefault(index % self.policy.buckets, _Slot())
        if slot.index != index:
            slot.__init__(index)  # type: ignore[misc]
        return index, slot

    def _window(self, index: int) -> list[_Slot]:
        return [s for s in self.slots.values() if s.index > index - self.policy.buckets]

    def _open(self, now: int) -> None:
        span = self.policy.open_for * 1000
        if self.policy.open_for_max:
            span = min(self.policy.open_for_max * 1000, span * 2**self.open_count)
        self.probes.clear()
        self.state, self.open_until = "open", now + int(span)
        self.open_count += 1
        self.transitions += 1

    def record(self, owner: str, outcome: str, *, probe: bool, first_attempt: bool, now: int) -> bool:
        """Count one outcome; True when it caused a transition."""
        with self.lock:
            return self._record(owner, outcome, probe=probe, first_attempt=first_attempt, now=now)

    def _record(self, owner: str, outcome: str, *, probe: bool, first_attempt: bool, now: int) -> bool:
        policy = self.policy
        if probe:
            self.probes.pop(owner, None)
        if outcome == "none":
            return False
        index, slot = self._slot(now)
        failed, slow = outcome in ("fail", "slowfail"), outcome in ("slow", "slowfail")
        slot.calls += 1
        slot.fails += int(failed)
        slot.slows += int(slow)
        slot.attempts += int(first_attempt)
        self.consec = self.consec + 1 if failed else 0
        if self.state == "half_open" and probe:
            if failed or slow:
                self._open(now)
                return True
            self.ho_ok += 1
            if self.ho_ok >= policy.half_open_probes:
                for s in self.slots.values():
                    s.index, s.calls, s.fails, s.slows = -1, 0, 0, 0
                self.state, self.open_count, self.ho_ok = "closed", 0, 0
                self.transitions += 1
                return True
            return False
        if self.state != "closed":
            return False
        window = self._window(index)
        calls = sum(s.calls for s in window)
        fails = sum(s.fails for s in window)
        slows = sum(s.slows for s in window)
        trip = calls >= policy.min_calls and fails / calls >= policy.failure_rate
        if policy.consecutive_failures and self.consec >= policy.consecutive_failures:
            trip = True
        if policy.slow_call_rate and calls >= policy.min_calls and slows / calls >= policy.slow_call_rate:
            trip = True
        if trip:
            self._open(now)
        return trip

    def spend_retry(self, budget: RetryBudget, now: int) -> bool:
        with self.lock:
            return self._spend_retry(budget, now)

    def _spend_retry(self, budget: RetryBudget, now: int) -> bool:
        bucket_ms = max(1, math.floor(self.policy.window * 1000 / self.policy.buckets))
        index = now // bucket_ms
        window = self._window(index)
        attempts = sum(s.attempts for s in window)
        retries = sum(s.retries for s in window)
        if retries + 1 > budget.ratio * attempts + budget.min_per_window:
            return False
        self._slot(now)[1].retries += 1
        return True
