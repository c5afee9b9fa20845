"""The Redis store against a real redis-server: script semantics, TTLs, NOSCRIPT."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis

from resilient_tasks.errors import StoreUnavailable
from resilient_tasks.store import Op, RedisStore
from resilient_tasks.testing import RedisServer, free_port

T0 = 1_000_000_000_000  # an injected clock, in ms


@pytest.fixture
def store(rt_redis_flushed: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(rt_redis_flushed.url(1), prefix="rt")
    yield s
    s.close()


def claim(
    store: RedisStore, key: str, owner: str, *, now: int, lease: int = 1000, fp: str = "fp", handoff: str = ""
) -> list[object]:
    (answer,) = store.run([Op("claim", (key,), (owner, lease, 60_000, fp, "tid", now, handoff))])
    return [a.decode() if isinstance(a, bytes) else a for a in answer]


def test_claim_complete_replay(store: RedisStore) -> None:
    key = store.key("idem", "k1")
    assert claim(store, key, "a", now=T0) == ["claimed", 1]
    assert store.run([Op("complete", (key,), ("a", 1, '{"ok": 1}', 60_000, T0 + 10))]) == [[1]]
    assert claim(store, key, "b", now=T0 + 20) == ["done", 1, '{"ok": 1}', T0 + 10, T0 + 20]


def test_live_claim_is_in_flight_then_expired_lease_is_taken_over(store: RedisStore) -> None:
    key = store.key("idem", "k2")
    claim(store, key, "a", now=T0, lease=1000)
    assert claim(store, key, "b", now=T0 + 400) == ["in_flight", 1, 600]
    assert claim(store, key, "b", now=T0 + 1001) == ["claimed", 2]
    # The stale owner's completion is refused, and it learns the record's state.
    refused = store.run([Op("complete", (key,), ("a", 1, "1", 60_000, T0 + 1100))])[0]
    assert refused[0] == 0 and refused[1] == b"in_flight"
    assert store.run([Op("complete", (key,), ("b", 2, "2", 60_000, T0 + 1200))]) == [[1]]


def test_fingerprint_mismatch_is_a_conflict(store: RedisStore) -> None:
    key = store.key("idem", "k3")
    claim(store, key, "a", now=T0, fp="args-1")
    assert claim(store, key, "b", now=T0 + 1, fp="args-2")[0] == "conflict"


def test_release_lets_the_next_claim_run_with_a_higher_token(store: RedisStore) -> None:
    key = store.key("idem", "k4")
    claim(store, key, "a", now=T0)
    assert store.run([Op("release", (key,), ("a", 1, 60_000))]) == [1]
    assert store.run([Op("release", (key,), ("a", 1, 60_000))]) == [0]
    assert claim(store, key, "b", now=T0 + 1) == ["claimed", 2]


def test_retry_hand_off_takes_over_a_live_claim(store: RedisStore) -> None:
    key = store.key("idem", "k5")
    claim(store, key, "first-run", now=T0, lease=60_000)
    assert claim(store, key, "stranger", now=T0 + 1)[0] == "in_flight"
    assert claim(store, key, "retry", now=T0 + 2, handoff="first-run") == ["claimed", 2]


def test_renew_extends_only_our_own_lease(store: RedisStore) -> None:
    key = store.key("idem", "k6")
    claim(store, key, "a", now=T0, lease=1000)
    assert store.run([Op("renew", (key,), ("a", 1, 1000, 60_000, T0 + 900))]) == [1]
    assert claim(store, key, "b", now=T0 + 1500)[0] == "in_flight"
    assert store.run([Op("renew", (key,), ("b", 1, 1000, 60_000, T0 + 1500))]) == [0]


def test_every_key_written_has_a_ttl_and_the_prefix(store: RedisStore) -> None:
    for i in range(20):
        key = store.key("idem", f"t{i}")
        claim(store, key, "a", now=T0)
        if i % 3 == 0:
            store.run([Op("complete", (key,), ("a", 1, "null", 5_000, T0))])
        elif i % 3 == 1:
            store.run([Op("release", (key,), ("a", 1, 5_000))])
    keys = list(store.client.scan_iter("*"))
    assert len(keys) == 20
    for key in keys:
        assert key.startswith(b"rt:idem:{")
        assert store.client.pttl(key) > 0


def test_noscript_after_script_flush_is_recovered(store: RedisStore) -> None:
    key = store.key("idem", "k7")
    claim(store, key, "a", now=T0)
    store.client.script_flush()
    # One batch of several scripts: all recovered, none run twice.
    answers = store.run(
        [
            Op("complete", (key,), ("a", 1, "7", 60_000, T0)),
            Op("claim", (store.key("idem", "k8"),), ("b", 1000, 60_000, "", "t", T0, "")),
        ]
    )
    assert answers[0] == [1]
    assert answers[1] == [b"claimed", 1]


def test_unreachable_redis_is_store_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    with pytest.raises(StoreUnavailable, match="failed"):
        store.run([Op("forget", ("rt:idem:{x}",), ())])


def test_hostile_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://127.0.0.1:1/0", prefix="a{b}")


def test_an_evicting_store_is_reported(rt_redis_flushed: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    client = rt_redis_flushed.client()
    client.config_set("maxmemory-policy", "volatile-lru")
    try:
        store = RedisStore(rt_redis_flushed.url(1))
        with caplog.at_level("WARNING"):
            assert store.check_eviction() == "volatile-lru"
        assert "may evict idempotency records" in caplog.text
        client.config_set("maxmemory-policy", "noeviction")
        assert RedisStore(rt_redis_flushed.url(1)).check_eviction() == "noeviction"
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_a_full_store_refuses_the_claim(rt_redis_flushed: RedisServer) -> None:
    client = rt_redis_flushed.client()
    client.config_set("maxmemory", "1")
    try:
        store = RedisStore(rt_redis_flushed.url(1))
        with pytest.raises(StoreUnavailable, match="maxmemory|OOM"):
            claim(store, store.key("idem", "full"), "a", now=T0)
    finally:
        client.config_set("maxmemory", "0")
        client.close()


def test_noscript_is_recovered_even_when_flushes_keep_coming(store: RedisStore) -> None:
    """A flush between loading and re-sending is answered by loading again."""
    flushes = {"left": 1}
    load_and_send = store._load_and_send

    def undone_by_a_flush(ops: Sequence[Op], deadline: float | None = None) -> list[Any]:
        if flushes["left"]:
            flushes["left"] -= 1
            # another SCRIPT FLUSH lands between our load and our EVALSHA
            store.client.script_flush()
            return store._send(ops)
        return load_and_send(ops, deadline)

    store._load_and_send = undone_by_a_flush  # type: ignore[method-assign]
    store.client.script_flush()
    key = store.key("idem", "flushy")
    answers = store.run([
        Op("claim", (key,), ("a", 1000, 60_000, "", "t", T0, "")),
        Op("claim", (store.key("idem", "flushy2"),), ("b", 1000, 60_000, "", "t", T0, "")),
    ])
    assert [a[0] for a in answers] == [b"claimed", b"claimed"]


class _CountingConnection(redis.connection.Connection):
    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def test_noscript_costs_one_extra_round_trip_and_warm_up_loads_every_script(
    rt_redis_flushed: RedisServer,
) -> None:
    store = RedisStore(rt_redis_flushed.url(1), connection_class=_CountingConnection)
    store.run([Op("claim", (store.key("idem", "prime"),), ("a", 1000, 60_000, "", "t", T0, ""))])
    store.client.script_flush()
    _CountingConnection.sent = 0
    before = store.requests_sent
    ops = [Op("claim", (store.key("idem", f"rt{n}"),), ("a", 1000, 60_000, "", "t", T0, "")) for n in range(2)]
    assert [a[0] for a in store.run(ops)] == [b"claimed", b"claimed"]
    trips = _CountingConnection.sent + store.requests_sent - before
    assert trips == 2, "EVALSHA, then SCRIPT LOAD + EVALSHA in one pipeline"

    store.client.script_flush()
    store.close()
    fresh = RedisStore(rt_redis_flushed.url(1), connection_class=_CountingConnection)
    fresh.warm()  # a worker starting: connects and loads every script in the background
    _CountingConnection.sent = 0
    before = fresh.requests_sent
    (answer,) = fresh.run([Op("claim", (fresh.key("idem", "w"),), ("a", 1000, 60_000, "", "t", T0, ""))])
    assert answer[0] == b"claimed"
    trips = _CountingConnection.sent + fresh.requests_sent - before
    assert trips == 1, "after warm-up the first call is one round trip (no SELECT, no SCRIPT LOAD)"
    store = fresh
    store.close()


def test_one_call_blocks_at_most_two_socket_timeouts(rt_redis_flushed: RedisServer) -> None:
    """Slow network, fresh connection, flushed scripts: connect + SELECT + EVALSHA have
    used up more than one timeout, so the NOSCRIPT recovery trip is not started."""
    import time

    from resilient_tasks.testing import FaultProxy

    with FaultProxy(rt_redis_flushed.port) as proxy:
        rt_redis_flushed.client().script_flush()
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
        proxy.latency(300, 0)  # 0.6 s a round trip
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="too slow"):
            store.run([Op("claim", (store.key("idem", "slow"),), ("a", 1000, 60_000, "", "t", T0, ""))])
        assert time.monotonic() - started <= 2.0
        proxy.clear()
        assert store.run([Op("claim", (store.key("idem", "slow"),), ("a", 1000, 60_000, "", "t", T0, ""))])
        store.close()


def test_connections_stay_few_whatever_the_threads_and_survive_a_server_side_close() -> None:
    """Short-lived threads (or greenlets) reuse idle connections instead of each leaving
    one open; a connection the server closed while idle is reopened, not failed."""
    with RedisServer() as server:  # its own server: only this store's connections on it
        _connections_stay_few(server)


def _connections_stay_few(server: RedisServer) -> None:
    import threading

    store = RedisStore(server.url(1))
    admin = server.client()
    errors: list[BaseException] = []

    def one_call(n: int) -> None:
        try:
            store.run([Op("claim", (store.key("idem", f"t{n}"),), ("a", 1000, 60_000, "", "t", T0, ""))])
        except BaseException as exc:
            errors.append(exc)

    for n in range(150):  # one after another: a new thread each time
        thread = threading.Thread(target=one_call, args=(n,))
        thread.start()
        thread.join()
    burst = [threading.Thread(target=one_call, args=(1000 + n,)) for n in range(16)]
    for thread in burst:
        thread.start()
    for thread in burst:
        thread.join()
    assert errors == []
    assert len(store._idle) <= 16
    ours = [c for c in admin.client_list() if int(c["db"]) == 1]
    assert len(ours) <= 16, "no connection per thread left behind"

    admin.client_kill_filter(_type="normal", skipme=True)  # e.g. a proxy or failover reset
    (answer,) = store.run([Op("claim", (store.key("idem", "after-kill"),), ("a", 1000, 60_000, "", "t", T0, ""))])
    assert answer[0] == b"claimed"
    store.close()
    admin.close()


@pytest.mark.parametrize("reader", ["python", "hiredis"])
def test_the_wire_reads_every_reply_a_real_server_sends(
    rt_redis_flushed: RedisServer, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our socket and reader against redis-server itself: big replies over many reads,
    CRLF inside a value, nil, nested arrays, error replies in place."""
    from resilient_tasks.store import wire

    if reader == "python":
        monkeypatch.setattr(wire, "hiredis", None)
    elif wire.hiredis is None:
        pytest.skip("hiredis is not installed")
    store = RedisStore(rt_redis_flushed.url(1), prefix="rt")
    conn = redis.connection.Connection()
    big = "x" * 300_000  # several recv()s
    commands = [
        ("SET", "rt:wire:big", big, "PX", 60_000),
        ("GET", "rt:wire:big"),
        ("SET", "rt:wire:crlf", "a\r\nb", "PX", 60_000),
        ("GET", "rt:wire:crlf"),
        ("GET", "rt:wire:absent"),
        ("EVAL", "return {1, {'two', false}, 'three'}", 0),
        ("EVALSHA", "0" * 40, 0),
        ("INCRBY", "rt:wire:big", 1),
    ]
    payload = b"".join(b"".join(conn.pack_command(*c)) for c in commands)
    answers = store._round_trip(payload, len(commands), None)
    assert answers[:6] == [b"OK", big.encode(), b"OK", b"a\r\nb", None, [1, [b"two", None], b"three"]]
    assert isinstance(answers[6], redis.exceptions.NoScriptError)
    assert isinstance(answers[7], redis.exceptions.ResponseError)
    # The connection is whole after all that: the next trip on it is answered in order.
    (again,) = store._round_trip(b"".join(conn.pack_command("GET", "rt:wire:crlf")), 1, None)
    assert again == b"a\r\nb"
    assert len(store._idle) == 1
    store.close()


def test_plain_tcp_store_connections_block_in_the_kernel_with_its_timeouts(rt_redis_flushed: RedisServer) -> None:
    """One system call per send and per read: the socket is blocking with SO_RCVTIMEO."""
    import socket
    import struct

    store = RedisStore(rt_redis_flushed.url(1) + "?socket_timeout=2.5", prefix="rt")
    store.run([Op("claim", (store.key("idem", "kt"),), ("a", 1000, 60_000, "", "t", T0, ""))])
    (wire_,) = store._idle
    assert wire_.kernel_timeouts and wire_.sock.gettimeout() is None
    seconds, micros = struct.unpack("ll", wire_.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    assert seconds + micros / 1e6 == pytest.approx(2.5, abs=0.01)
    store.close()


def test_under_gevent_the_store_keeps_green_sockets_and_its_timeouts(rt_redis_flushed: RedisServer) -> None:
    """A gevent worker's sockets wait in the hub: they must keep Python's timeout mode
    (a blocking socket would hang the hub), answer many greenlets at once, and still give
    up on a silent store within two socket timeouts."""
    import select
    import subprocess
    import sys
    import textwrap

    from resilient_tasks.testing import FaultProxy

    pytest.importorskip("gevent")
    with FaultProxy(rt_redis_flushed.port) as proxy:
        script = textwrap.dedent(f"""
            from gevent import monkey; monkey.patch_all()
            import sys, time, gevent
            from resilient_tasks.errors import StoreUnavailable
            from resilient_tasks.store import Op, RedisStore
            store = RedisStore("redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
            def op(n):
                return Op("claim", (store.key("idem", f"g{{n}}"),), ("a", 1000, 60000, "", "t", 1, ""))
            jobs = [gevent.spawn(store.run, [op(n)]) for n in range(20)]
            gevent.joinall(jobs, raise_error=True)
            assert all(job.value[0][0] == b"claimed" for job in jobs), [job.value for job in jobs]
            assert store._idle and not any(w.kernel_timeouts for w in store._idle)
            print("READY", flush=True)
            sys.stdin.readline()
            started = time.monotonic()
            try:
                store.run([op(99)])
                print("ANSWERED", flush=True)
            except StoreUnavailable:
                print("GAVE_UP", round(time.monotonic() - started, 2), flush=True)
        """)
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, "the greenlets' calls never finished (a blocking socket in the hub?)"
            assert child.stdout.readline().strip() == "READY"
            proxy.blackhole(10)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.wait(timeout=30) == 0
            verdict = child.stdout.readline().split()
        finally:
            if child.poll() is None:
                child.kill()
        assert verdict[0] == "GAVE_UP" and float(verdict[1]) <= 2.0, verdict


def test_signals_arriving_while_the_store_is_silent_do_not_extend_the_wait(rt_redis_flushed: RedisServer) -> None:
    """A signal interrupts a blocked read, and a kernel timeout would start again in full
    after each one: the store's read waits in ``poll`` for the time left instead."""
    import signal
    import time

    from resilient_tasks.testing import FaultProxy

    with FaultProxy(rt_redis_flushed.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
        store.run([Op("claim", (store.key("idem", "sig0"),), ("a", 1000, 60_000, "", "t", T0, ""))])
        ticks: list[float] = []
        previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(time.monotonic()))
        signal.setitimer(signal.ITIMER_REAL, 0.3, 0.3)
        proxy.blackhole(10)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable):
                store.run([Op("claim", (store.key("idem", "sig1"),), ("a", 1000, 60_000, "", "t", T0, ""))])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)
            proxy.clear()
            store.close()
        assert len(ticks) >= 3, "the signals did arrive during the wait"
        assert time.monotonic() - started <= 2.0
