"""The store contract: every operation answers alike on ``MemoryStore`` and ``RedisStore``.

Each test runs on both (``backend`` fixture); the ones marked ``EVERYWHERE`` run on a
3-master Redis Cluster too. Times are sent explicitly (``T0 + ms``), so the scripts and
the Python twin see the same clock; TTLs run on the real clock, as in Redis.
"""

from __future__ import annotations

import threading
import time

import pytest

from resilient_tasks.policy import BreakerPolicy, RetryBudget
from resilient_tasks.store.protocol import (
    Admission,
    Admit,
    CacheEntry,
    CacheGet,
    CachePut,
    Claim,
    ClaimAnswer,
    Complete,
    CompleteAnswer,
    Forget,
    Record,
    Recorded,
    Release,
    Renew,
    SpendAnswer,
    SpendRetry,
    Store,
    Switch,
    SwitchAnswer,
)
from resilient_tasks.store.redis import RedisStore

from .conftest import T0, Backend

EVERYWHERE = pytest.mark.parametrize("backend", ["memory", "redis", "cluster"], indirect=True)


def claim(store: Store, record: str, owner: str, now: int, *, lease: int = 1000, fp: str = "fp",
          handoff: str = "", peek: bool = False) -> ClaimAnswer:  # fmt: skip
    (answer,) = store.batch([Claim(record, owner, lease, 60_000, fp, "tid", handoff, peek, now)])
    return answer  # type: ignore[no-any-return]


def one(store: Store, op: object) -> object:
    (answer,) = store.batch([op])  # type: ignore[list-item]
    return answer


# -- idempotency --------------------------------------------------------------------------


@EVERYWHERE
def test_claim_complete_then_a_duplicate_replays_the_result(store: Store) -> None:
    assert claim(store, "k1", "a", T0) == ClaimAnswer("claimed", 1)
    assert one(store, Complete("k1", "a", 1, '{"ok": 1}', 60_000, T0 + 10)) == CompleteAnswer(True)
    assert claim(store, "k1", "b", T0 + 20) == ClaimAnswer("done", 1, '{"ok": 1}')
    assert claim(store, "k1", "b", T0 + 20, peek=True) == ClaimAnswer("done", 1, '{"ok": 1}')


def pause(ms: int) -> None:
    """Real time passing: a lease is the record's own expiry, which an injected clock
    does not move (in Redis as in memory)."""
    time.sleep(ms / 1000.0)


def in_flight_for(answer: ClaimAnswer, token: int, at_most: int, at_least: int = 1) -> bool:
    return answer.verdict == "in_flight" and answer.token == token and at_least <= answer.remaining_ms <= at_most


def test_a_live_claim_is_in_flight_and_an_expired_lease_is_taken_over(store: Store) -> None:
    claim(store, "k2", "a", T0, lease=300)
    assert in_flight_for(claim(store, "k2", "b", T0), 1, at_most=300, at_least=150)
    pause(120)
    assert in_flight_for(claim(store, "k2", "b", T0), 1, at_most=180)
    pause(200)
    assert claim(store, "k2", "b", T0) == ClaimAnswer("claimed", 2)


def test_complete_from_a_stale_owner_is_refused_and_tells_the_records_state(store: Store) -> None:
    claim(store, "k3", "a", T0, lease=100)
    pause(120)
    assert claim(store, "k3", "b", T0) == ClaimAnswer("claimed", 2), "a's lease ran out: b holds token 2"
    assert one(store, Complete("k3", "a", 1, "1", 60_000, T0 + 1100)) == CompleteAnswer(False, "in_flight")
    assert one(store, Complete("k3", "b", 2, "2", 60_000, T0 + 1200)) == CompleteAnswer(True)
    assert one(store, Complete("k3", "a", 1, "1", 60_000, T0 + 1300)) == CompleteAnswer(False, "done", "2")
    assert one(store, Complete("gone", "a", 1, "1", 60_000, T0)) == CompleteAnswer(False, "", None)
    claim(store, "k3r", "a", T0)
    one(store, Release("k3r", "a", 1, 60_000))
    assert one(store, Complete("k3r", "a", 1, "1", 60_000, T0)) == CompleteAnswer(False, "released", None)


def test_the_same_key_with_other_arguments_is_a_conflict(store: Store) -> None:
    claim(store, "k4", "a", T0, fp="args-1")
    assert claim(store, "k4", "b", T0 + 1, fp="args-2") == ClaimAnswer("conflict", 1)
    assert claim(store, "k4", "b", T0 + 1, fp="")[0] == "in_flight", "no fingerprint: no conflict"
    one(store, Complete("k4", "a", 1, "r", 60_000, T0 + 2))
    assert claim(store, "k4", "b", T0 + 3, fp="args-2") == ClaimAnswer("conflict", 1)
    assert claim(store, "k4", "b", T0 + 3, fp="args-1") == ClaimAnswer("done", 1, "r")
    claim(store, "k4b", "a", T0, fp="args-1")
    one(store, Release("k4b", "a", 1, 60_000))
    assert claim(store, "k4b", "b", T0 + 1, fp="args-2") == ClaimAnswer("claimed", 2), "released: free"


def test_peek_looks_without_taking(store: Store) -> None:
    assert claim(store, "k5", "a", T0, peek=True) == ClaimAnswer("free", 0)
    assert claim(store, "k5", "a", T0, peek=True) == ClaimAnswer("free", 0)
    assert claim(store, "k5", "a", T0) == ClaimAnswer("claimed", 1), "the peek took nothing"
    assert in_flight_for(claim(store, "k5", "b", T0 + 1, peek=True), 1, at_most=1000, at_least=500)
    one(store, Release("k5", "a", 1, 60_000))
    assert claim(store, "k5", "b", T0 + 2, peek=True) == ClaimAnswer("free", 1)


def test_release_lets_the_next_claim_run_and_only_the_owner_releases(store: Store) -> None:
    claim(store, "k6", "a", T0)
    assert one(store, Release("k6", "stranger", 1, 60_000)) is False
    assert one(store, Release("k6", "a", 2, 60_000)) is False, "wrong token"
    assert one(store, Release("k6", "a", 1, 60_000)) is True
    assert one(store, Release("k6", "a", 1, 60_000)) is False
    assert claim(store, "k6", "b", T0 + 1) == ClaimAnswer("claimed", 2)


def test_a_retry_hands_off_its_own_live_claim(store: Store) -> None:
    claim(store, "k7", "first-run", T0, lease=60_000)
    assert claim(store, "k7", "stranger", T0 + 1)[0] == "in_flight"
    assert claim(store, "k7", "stranger", T0 + 1, handoff="someone-else")[0] == "in_flight"
    assert claim(store, "k7", "retry", T0 + 2, handoff="first-run") == ClaimAnswer("claimed", 2)
    assert one(store, Complete("k7", "first-run", 1, "x", 60_000, T0 + 3)) == CompleteAnswer(False, "in_flight")


def test_renew_extends_only_the_owners_lease(store: Store) -> None:
    claim(store, "k8", "a", T0, lease=300)
    pause(200)
    assert one(store, Renew("k8", "a", 1, 300, 60_000, T0)) is True
    pause(200)  # 400 ms after the claim: alive only because it was renewed
    assert in_flight_for(claim(store, "k8", "b", T0), 1, at_most=100)
    assert one(store, Renew("k8", "b", 1, 300, 60_000, T0)) is False
    assert one(store, Renew("k8", "a", 2, 300, 60_000, T0)) is False
    pause(120)
    assert claim(store, "k8", "b", T0)[0] == "claimed"
    assert one(store, Renew("k8", "a", 1, 300, 60_000, T0)) is False, "taken over: lost"


def test_a_completed_record_lives_at_least_its_ttl(backend: Backend) -> None:
    """A claim lives lease + ttl; a completion early in the lease keeps that (one
    command less), one that asks to refresh lives ttl from then."""
    store = backend.store
    claim(store, "k8t", "a", T0, lease=5_000)
    assert one(store, Complete("k8t", "a", 1, "r", 60_000, T0, refresh=False)) == CompleteAnswer(True)
    claim(store, "k8r", "a", T0, lease=5_000)
    assert one(store, Complete("k8r", "a", 1, "r", 60_000, T0, refresh=True)) == CompleteAnswer(True)
    ttls = backend.keys()
    if backend.kind != "memory":
        kept = {key.rsplit("{", 1)[1].rstrip("}"): pttl for key, pttl in ttls.items() if ":idem:" in key}
        assert 60_000 < kept["k8t"] <= 65_000, kept
        assert 59_000 < kept["k8r"] <= 60_000, kept
    assert claim(store, "k8t", "b", T0) == ClaimAnswer("done", 1, "r")


def test_fencing_tokens_never_go_back(store: Store) -> None:
    """Release, lease expiry and re-claims only ever raise the record's token."""
    tokens = []
    now = T0
    for step in range(12):
        now += 10
        answer = claim(store, "k9", f"o{step}", now, lease=50)
        assert answer[0] == "claimed", answer
        tokens.append(answer.token)
        if step % 3 == 0:
            assert one(store, Release("k9", f"o{step}", answer.token, 60_000)) is True
        elif step % 3 == 1:
            pause(60)  # the lease runs out while "running"
        else:
            one(store, Renew("k9", f"o{step}", answer.token, 50, 60_000, now))
            pause(60)
    assert tokens == list(range(1, 13))
    one(store, Complete("k9", "o11", 12, "done", 60_000, now))
    assert claim(store, "k9", "late", now + 1) == ClaimAnswer("done", 12, "done")


def test_forget_drops_the_record(store: Store) -> None:
    claim(store, "k10", "a", T0)
    one(store, Complete("k10", "a", 1, "r", 60_000, T0))
    assert one(store, Forget("k10")) is True
    assert one(store, Forget("k10")) is False
    assert claim(store, "k10", "b", T0 + 1) == ClaimAnswer("claimed", 1)


def test_records_vanish_when_their_ttl_runs_out(store: Store) -> None:
    (answer,) = store.batch([Claim("k11", "a", 40, 40, now_ms=T0)])
    assert answer == ClaimAnswer("claimed", 1)
    store.batch([CachePut("f11", '"v"', "ok", 40, T0)])
    time.sleep(0.15)
    assert claim(store, "k11", "b", T0, peek=True) == ClaimAnswer("free", 0), "expired: gone, token too"
    assert one(store, CacheGet("f11", serve=True, ttl_ms=60_000, floor_ms=1, now_ms=T0)) == CacheEntry()


# -- breakers -------------------------------------------------------------------------------

TRIP_AT_2 = BreakerPolicy(consecutive_failures=2, open_for=1.0)


def admit(store: Store, policy: BreakerPolicy, owner: str, now: int, name: str = "svc") -> Admission:
    return one(store, Admit(name, policy, owner, now))  # type: ignore[return-value]


def record(store: Store, policy: BreakerPolicy, now: int, *, owner: str = "", probe: bool = False,
           name: str = "svc", **counts: int) -> Recorded:  # fmt: skip
    return one(store, Record(name, policy, owner, probe=probe, now_ms=now, **counts))  # type: ignore[return-value]


@EVERYWHERE
def test_the_breaker_opens_half_opens_and_closes(store: Store) -> None:
    p = TRIP_AT_2
    assert admit(store, p, "w", T0) == Admission("allow", "closed", 0, 0, "normal")
    assert record(store, p, T0, fail=1) == Recorded("closed", False, 1)
    assert record(store, p, T0 + 1, fail=1) == Recorded("open", True, 2)
    assert admit(store, p, "w", T0 + 200) == Admission("reject", "open", 801, 2, "normal")
    assert admit(store, p, "w", T0 + 1001) == Admission("probe", "half_open", 0, 2, "normal")
    rejected = admit(store, p, "x", T0 + 1002)
    assert rejected.verdict == "reject" and rejected.state == "half_open"
    assert record(store, p, T0 + 1100, owner="w", probe=True, fail=1) == Recorded("open", True, 3)
    assert admit(store, p, "w", T0 + 2101) == Admission("probe", "half_open", 0, 3, "normal")
    assert record(store, p, T0 + 2200, owner="w", probe=True, ok=1) == Recorded("closed", True, 0)
    assert admit(store, p, "z", T0 + 2201) == Admission("allow", "closed", 0, 0, "normal")


def test_failure_rate_over_min_calls_in_the_window_trips(store: Store) -> None:
    p = BreakerPolicy(failure_rate=0.5, min_calls=4, window=10.0, buckets=5)
    assert record(store, p, T0, ok=2) == Recorded("closed", False, 0)
    assert record(store, p, T0 + 1, fail=1) == Recorded("closed", False, 1), "3 calls: under min_calls"
    assert record(store, p, T0 + 2, fail=1) == Recorded("open", True, 2), "2 of 4 failed"
    q = BreakerPolicy(failure_rate=0.5, min_calls=4, window=10.0, buckets=5)
    assert record(store, q, T0, fail=2, name="slide") == Recorded("closed", False, 2)
    assert record(store, q, T0 + 10_000, ok=3, name="slide") == Recorded("closed", False, 0), "old failures left"


def test_a_flush_of_many_counts_is_one_record(store: Store) -> None:
    """A process sums its successes and flushes them at once; successes are taken first,
    so a failure in the same record still counts as consecutive."""
    p = BreakerPolicy(failure_rate=0.5, min_calls=10, consecutive_failures=3, open_for=5)
    assert record(store, p, T0, ok=40) == Recorded("closed", False, 0)
    assert record(store, p, T0, ok=5, fail=2) == Recorded("closed", False, 2)
    assert record(store, p, T0, fail=1) == Recorded("open", True, 3)
    assert record(store, p, T0 + 1, ok=9, name="rate") == Recorded("closed", False, 0)
    assert record(store, p, T0 + 2, slowfail=4, slow=1, fail=5, name="rate") == Recorded("open", True, 9)


def test_slow_calls_trip_on_their_own_rate(store: Store) -> None:
    p = BreakerPolicy(failure_rate=1.0, min_calls=4, slow_call=1.0, slow_call_rate=0.5)
    assert record(store, p, T0, ok=2, slow=1) == Recorded("closed", False, 0)
    assert record(store, p, T0 + 1, slow=1) == Recorded("open", True, 0)


def test_open_for_grows_on_repeated_opens_up_to_its_cap(store: Store) -> None:
    p = BreakerPolicy(consecutive_failures=1, open_for=1.0, open_for_max=3.0)
    now = T0
    record(store, p, now, fail=1)
    spans = []
    for _ in range(3):
        reject = admit(store, p, "w", now)
        spans.append(reject.retry_after_ms)
        now += reject.retry_after_ms
        assert admit(store, p, "w", now).verdict == "probe"
        record(store, p, now, owner="w", probe=True, fail=1)
    assert spans == [1000, 2000, 3000]


def test_racing_failures_make_exactly_one_transition(backend: Backend) -> None:
    store = backend.store
    p = BreakerPolicy(consecutive_failures=5, open_for=60)
    results: list[Recorded] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(6):
            answer = record(store, p, T0 + i, owner=f"w{n}", fail=1, name="race")
            with lock:
                results.append(answer)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 48
    assert sum(r.transitioned for r in results) == 1
    (view,) = [v for v in store.breakers() if v.downstream == "race"]
    assert view.fields["state"] == "open" and view.fields["transitions"] == "1"


@EVERYWHERE
def test_half_open_admits_exactly_the_probes_fleet_wide_and_leases_expire(backend: Backend) -> None:
    store = backend.store
    p = BreakerPolicy(consecutive_failures=1, open_for=2.0, half_open_probes=3)
    record(store, p, T0, fail=1, name="probes")
    now = T0 + 2000
    verdicts: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(5):
            answer = admit(store, p, f"w{n}-{i}", now, name="probes")
            with lock:
                verdicts.append(answer.verdict)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verdicts.count("probe") == 3 and verdicts.count("reject") == 27
    late = admit(store, p, "late", now + 1999, name="probes")
    assert late == Admission("reject", "half_open", 1, 1, "normal"), "the soonest lease frees in 1 ms"
    # a probe that never came back: its lease (open_for, here 2 s) expires and frees its slot
    assert [admit(store, p, f"n{i}", now + 2000, name="probes").verdict for i in range(4)] == [
        "probe", "probe", "probe", "reject"
    ]  # fmt: skip


def test_a_probe_that_never_called_frees_its_lease(store: Store) -> None:
    p = BreakerPolicy(consecutive_failures=1, open_for=1.0, half_open_probes=1)
    record(store, p, T0, fail=1)
    assert admit(store, p, "a", T0 + 1000).verdict == "probe"
    assert admit(store, p, "b", T0 + 1001).verdict == "reject"
    assert record(store, p, T0 + 1002, owner="a", probe=True) == Recorded("half_open", False, 1)
    assert admit(store, p, "b", T0 + 1003).verdict == "probe"


def test_half_open_closes_after_every_probe_succeeded(store: Store) -> None:
    p = BreakerPolicy(consecutive_failures=1, open_for=1.0, half_open_probes=2)
    record(store, p, T0, fail=1)
    assert [admit(store, p, o, T0 + 1000).verdict for o in "abc"] == ["probe", "probe", "reject"]
    assert record(store, p, T0 + 1001, owner="a", probe=True, ok=1) == Recorded("half_open", False, 0)
    assert record(store, p, T0 + 1002, owner="b", probe=True, ok=1) == Recorded("closed", True, 0)
    assert record(store, p, T0 + 1003, fail=1) == Recorded("open", True, 1), "the window was emptied"


# -- retry budget ------------------------------------------------------------------------


@EVERYWHERE
def test_the_retry_budget_is_a_ratio_of_first_attempts_plus_a_floor(store: Store) -> None:
    p = BreakerPolicy(window=10.0, buckets=5)
    budget = RetryBudget(ratio=0.5, min_per_window=2)

    def spend(now: int) -> SpendAnswer:
        return one(store, SpendRetry("budget", p, budget, now))  # type: ignore[return-value]

    assert [spend(T0).granted for _ in range(3)] == [True, True, False], "the floor: 2"
    record(store, p, T0, ok=4, first_attempts=4, name="budget")
    assert spend(T0 + 1) == SpendAnswer(True, 3, 4)
    assert spend(T0 + 2) == SpendAnswer(True, 4, 4)
    assert spend(T0 + 3) == SpendAnswer(False, 4, 4)
    assert spend(T0 + 10_000) == SpendAnswer(True, 1, 0), "the window slid past them"


# -- switches ------------------------------------------------------------------------------


def switch(store: Store, mode: str, source: str = "cli", name: str = "sw") -> SwitchAnswer:
    return one(store, Switch(name, mode, source, T0))  # type: ignore[arg-type,return-value]


@EVERYWHERE
def test_switch_modes_decide_admission(store: Store) -> None:
    p = TRIP_AT_2
    assert switch(store, "forced_open") == SwitchAnswer("normal", True)
    assert admit(store, p, "w", T0, "sw") == Admission("reject", "closed", 1000, 0, "forced_open")
    assert switch(store, "fallback_only") == SwitchAnswer("forced_open", True)
    assert admit(store, p, "w", T0, "sw").verdict == "reject"
    switch(store, "reject")
    assert admit(store, p, "w", T0, "sw") == Admission("reject", "closed", 1000, 0, "reject")
    switch(store, "breaker_disabled")
    for i in range(3):
        assert record(store, p, T0 + i, fail=1, name="sw").transitioned is False
    assert admit(store, p, "w", T0 + 5, "sw") == Admission("allow", "closed", 0, 3, "breaker_disabled")
    switch(store, "forced_closed")
    assert admit(store, p, "w", T0 + 5, "sw").verdict == "allow"
    assert switch(store, "normal") == SwitchAnswer("forced_closed", True)
    assert record(store, p, T0 + 6, fail=1, name="sw") == Recorded("open", True, 4)
    assert admit(store, p, "w", T0 + 7, "sw").verdict == "reject"


def test_close_and_reset_answer_the_real_previous_switch(store: Store) -> None:
    p = TRIP_AT_2
    record(store, p, T0, fail=2, name="sw")
    switch(store, "forced_open")
    assert switch(store, "close") == SwitchAnswer("forced_open", True)
    assert admit(store, p, "w", T0 + 1, "sw") == Admission("allow", "closed", 0, 0, "normal")
    assert switch(store, "close") == SwitchAnswer("normal", True)
    switch(store, "reject")
    assert switch(store, "reset") == SwitchAnswer("reject", True)
    (view,) = [v for v in store.breakers() if v.downstream == "sw"]
    assert view.fields["state"] == "closed" and "switch" not in view.fields and "consec" not in view.fields
    assert switch(store, "reset", name="never-seen") == SwitchAnswer("normal", True)


def test_a_files_switch_applies_only_when_the_file_changed(store: Store) -> None:
    assert switch(store, "fallback_only", "file") == SwitchAnswer("normal", True)
    assert switch(store, "fallback_only", "file") == SwitchAnswer("fallback_only", False)
    assert switch(store, "normal", "cli") == SwitchAnswer("fallback_only", True), "an operator's command"
    assert switch(store, "fallback_only", "file") == SwitchAnswer("normal", False), "not undone by a re-read"
    assert switch(store, "reset", "cli") == SwitchAnswer("normal", True)
    assert switch(store, "fallback_only", "file") == SwitchAnswer("normal", False), "reset keeps the file's memory"
    assert switch(store, "reject", "file") == SwitchAnswer("normal", True), "the file changed"
    assert admit(store, TRIP_AT_2, "w", T0, "sw").switch == "reject"


# -- fallback cache ----------------------------------------------------------------------------


def get(store: Store, record: str, now: int, *, serve: bool = True, failures: int = 0, ttl: int = 100_000,
        decay: float = 0.5, floor: int = 10_000, max_stale: int = 0) -> CacheEntry:  # fmt: skip
    return one(store, CacheGet(record, serve, failures, ttl, decay, floor, max_stale, now))  # type: ignore[return-value]


def put(store: Store, record: str, value: str, kind: str, now: int, ttl: int = 300_000) -> None:
    assert one(store, CachePut(record, value, kind, ttl, now)) is True  # type: ignore[arg-type]


@EVERYWHERE
def test_a_good_value_is_served_only_with_serve_and_while_trusted(store: Store) -> None:
    put(store, "c1", '{"v": 1}', "ok", T0)
    assert get(store, "c1", T0 + 5, serve=False) == CacheEntry(good_age_ms=5), "a peek: only its age"
    assert get(store, "c1", T0 + 5) == CacheEntry("ok", '{"v": 1}', 5, 100_000, good_age_ms=5)
    assert get(store, "c1", T0 + 30_000, failures=1) == CacheEntry("ok", '{"v": 1}', 30_000, 50_000, None, 30_000)
    assert get(store, "c1", T0 + 30_000, failures=3) == CacheEntry(), "12.5 s trusted: too old, dropped"
    assert get(store, "c1", T0 + 31_000, failures=0) == CacheEntry(), "dropped for good"


def test_decay_stops_at_the_floor_and_max_stale_bounds_age(store: Store) -> None:
    put(store, "c2", "1", "ok", T0)
    assert get(store, "c2", T0 + 9_000, failures=30) == CacheEntry("ok", "1", 9_000, 10_000, None, 9_000), "the floor"
    assert get(store, "c2", T0 + 9_500, max_stale=9_000) == CacheEntry()
    put(store, "c3", "2", "ok", T0)
    assert get(store, "c3", T0 + 1, max_stale=5_000) == CacheEntry("ok", "2", 1, 5_000, None, 1)


def test_negative_answers_and_recent_failures_are_always_told(store: Store) -> None:
    put(store, "c4", '"not found"', "negative", T0, ttl=60_000)
    assert get(store, "c4", T0 + 1, serve=False) == CacheEntry("negative", '"not found"')
    assert get(store, "c4", T0 + 1) == CacheEntry("negative", '"not found"')
    put(store, "c5", "good", "ok", T0)
    put(store, "c5", "boom", "failure", T0 + 10, ttl=1_000)
    assert get(store, "c5", T0 + 20, serve=False) == CacheEntry("failure", "boom", good_age_ms=20)
    assert get(store, "c5", T0 + 20) == CacheEntry("ok", "good", 20, 100_000, "boom", 20), "beside, not instead"
    assert get(store, "c5", T0 + 1_011, serve=False) == CacheEntry(good_age_ms=1_011), "the failure is old news"
    assert get(store, "c5", T0 + 1_011) == CacheEntry("ok", "good", 1_011, 100_000, None, 1_011)
    put(store, "c5", "boom", "failure", T0 + 2_000, ttl=1_000)
    put(store, "c5", "better", "ok", T0 + 2_001)
    assert get(store, "c5", T0 + 2_002) == CacheEntry("ok", "better", 1, 100_000, None, 1), "a success clears it"
    assert get(store, "c5", T0 + 2_002, serve=False) == CacheEntry(good_age_ms=1), "and the failure with it"


def test_a_failure_outlives_a_value_too_old_to_serve(store: Store) -> None:
    put(store, "c6", "old", "ok", T0)
    put(store, "c6", "boom", "failure", T0 + 50_000, ttl=10_000)
    assert get(store, "c6", T0 + 50_001, floor=1_000, ttl=20_000) == CacheEntry("failure", "boom")
    assert get(store, "c6", T0 + 50_002) == CacheEntry("failure", "boom"), "the value is gone"
    put(store, "c7", "boom", "failure", T0, ttl=10_000)
    assert get(store, "c7", T0 + 1) == CacheEntry("failure", "boom"), "a failure with no value beside"


@EVERYWHERE
def test_every_read_tells_the_age_of_the_good_value_held(store: Store) -> None:
    """``good_age_ms``: a caller skips rewriting an entry that is still fresh. -1 when no
    good value is held: none written, a negative answer instead, or one dropped as too
    old by this very read."""
    assert get(store, "g1", T0, serve=False).good_age_ms == -1, "nothing stored"
    assert get(store, "g1", T0).good_age_ms == -1
    put(store, "g1", "v", "ok", T0)
    assert get(store, "g1", T0 + 250, serve=False) == CacheEntry(good_age_ms=250), "a peek"
    assert get(store, "g1", T0 + 300).good_age_ms == 300, "a serve"
    put(store, "g1", "boom", "failure", T0 + 400, ttl=1_000)
    assert get(store, "g1", T0 + 500, serve=False) == CacheEntry("failure", "boom", good_age_ms=500)
    put(store, "g1", "w", "ok", T0 + 600)
    assert get(store, "g1", T0 + 700, serve=False) == CacheEntry(good_age_ms=100), "rewritten: younger"
    put(store, "g1", '"gone"', "negative", T0 + 800)
    assert get(store, "g1", T0 + 900, serve=False) == CacheEntry("negative", '"gone"'), "a negative: -1"
    put(store, "g2", "old", "ok", T0)
    put(store, "g2", "boom", "failure", T0 + 50_000, ttl=10_000)
    assert get(store, "g2", T0 + 50_001, serve=False).good_age_ms == 50_001, "a peek drops nothing"
    assert get(store, "g2", T0 + 50_002, floor=1_000, ttl=20_000) == CacheEntry("failure", "boom"), "dropped"
    assert get(store, "g2", T0 + 50_003, serve=False) == CacheEntry("failure", "boom")
    put(store, "g3", "old", "ok", T0)
    assert get(store, "g3", T0 + 200_000) == CacheEntry(), "too old to serve: dropped, -1"
    put(store, "g4", "skewed", "ok", T0 + 10)
    assert get(store, "g4", T0, serve=False).good_age_ms == 0, "a clock behind the writer's: never below 0"


# -- the batch and operators' reads ------------------------------------------------------------


@EVERYWHERE
def test_a_batch_is_one_trip_with_answers_in_order(store: Store) -> None:
    before = store.trips
    answers = store.batch([
        Claim("b1", "a", 1000, 60_000, now_ms=T0),
        Admit("batch-svc", TRIP_AT_2, "a", T0),
        CacheGet("b1", now_ms=T0),
        Claim("b1", "b", 1000, 60_000, now_ms=T0 + 1),
        Record("batch-svc", TRIP_AT_2, "a", fail=1, now_ms=T0),
        CachePut("b1", "v", "ok", 60_000, T0),
        SpendRetry("batch-svc", TRIP_AT_2, RetryBudget(), T0),
        Switch("batch-svc", "normal", now_ms=T0),
        Renew("b1", "a", 1, 1000, 60_000, T0),
        Complete("b1", "a", 1, "r", 60_000, T0),
        Release("b1", "a", 1, 60_000),
        Forget("b1"),
    ])  # fmt: skip
    assert store.trips == before + 1
    assert in_flight_for(answers[3], 1, at_most=1000, at_least=900)
    assert answers == [
        ClaimAnswer("claimed", 1),
        Admission("allow", "closed", 0, 0, "normal"),
        CacheEntry(),
        answers[3],
        Recorded("closed", False, 1),
        True,
        SpendAnswer(True, 1, 0),
        SwitchAnswer("normal", True),
        True,
        CompleteAnswer(True),
        False,
        True,
    ]
    assert store.batch([]) == [] and store.trips == before + 1


def test_breakers_lists_each_breaker_by_name(store: Store) -> None:
    record(store, TRIP_AT_2, T0, fail=2, name="payments")
    admit(store, TRIP_AT_2, "w", T0, name="inventory")
    views = store.breakers()
    assert [v.downstream for v in views] == ["inventory", "payments"]
    assert views[1].fields["state"] == "open" and views[1].fields["consec"] == "2"
    assert views[0].fields["state"] == "closed"


def test_the_stores_clock_is_now(store: Store) -> None:
    assert abs(store.now_ms() - time.time() * 1000) < 2_000
    store.ping()
    store.warm()


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
def test_every_key_has_the_prefix_a_hash_tag_and_a_ttl(backend: Backend) -> None:
    store = backend.store
    assert isinstance(store, RedisStore)
    p = TRIP_AT_2
    for i in range(12):
        store.batch([
            Claim(f"r{i}", "a", 1000, 60_000, now_ms=T0),
            Complete(f"r{i}", "a", 1, "x", 5_000, T0) if i % 2 else Release(f"r{i}", "a", 1, 5_000),
            CachePut(f"r{i}", "v", ("ok", "negative", "failure")[i % 3], 5_000, T0),
            Admit(f"svc-{i}", p, "a", T0),
            Record(f"svc-{i % 4}", p, "a", fail=1, now_ms=T0),
            SpendRetry(f"budget-{i % 3}", p, RetryBudget(), T0),
            Switch(f"switch-{i % 2}", "reset" if i % 2 else "fallback_only", now_ms=T0),
        ])  # fmt: skip
    keys = backend.keys()
    prefix = store.prefix
    families = {key.split(":")[1] for key in keys}
    assert families <= {"idem", "fb", "brk", "meta"}, families
    assert sum(1 for k in keys if k.startswith(f"{prefix}:idem:{{")) == 12
    assert sum(1 for k in keys if k.startswith(f"{prefix}:fb:{{")) == 12
    assert sum(1 for k in keys if k.startswith(f"{prefix}:brk:{{")) == 12 + 3 + 2
    for key, pttl in keys.items():
        assert pttl > 0, f"{key} has no TTL"
        assert key.startswith(f"{prefix}:") and key.count("{") == 1 and "}" in key
        assert "svc" not in key and "budget" not in key, "a breaker's name never appears in its key"
