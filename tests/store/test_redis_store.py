"""What only ``RedisStore`` does, against real redis-servers: round trips counted on the
connection, NOSCRIPT recovery, timeouts, TLS + ACL, store amnesia, redaction, errors."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

from resilient_tasks.errors import StoreUnavailable
from resilient_tasks.policy import BreakerPolicy
from resilient_tasks.store import redis as redisops
from resilient_tasks.store.evalsha import scripts
from resilient_tasks.store.protocol import (
    Admit,
    CacheGet,
    Claim,
    ClaimAnswer,
    Complete,
    CompleteAnswer,
    Record,
    Release,
    Renew,
)
from resilient_tasks.store.redis import RedisStore
from resilient_tasks.store.urls import parse_sentinel_url, redact
from resilient_tasks.testing import ClusterServers, FaultProxy, RedisServer, free_port

from .conftest import T0


def claim_op(record: str, owner: str = "a", now: int = T0, lease: int = 1000) -> Claim:
    return Claim(record, owner, lease, 60_000, now_ms=now)


class Counting(redis.connection.Connection):
    """Counts what redis-py writes on our connections: one write is one round trip."""

    sent: ClassVar[list[bytes]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, (bytes, str)) else list(command)
        type(self).sent.append(b"".join(c if isinstance(c, bytes) else bytes(c) for c in chunks))
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@pytest.fixture
def counted(rt_redis_flushed: RedisServer) -> Iterator[RedisStore]:
    RedisStore(rt_redis_flushed.url(1)).warm()  # whatever an earlier test flushed
    Counting.sent = []
    store = RedisStore(rt_redis_flushed.url(1), connection_class=Counting)
    yield store
    store.close()


# -- round trips ------------------------------------------------------------------------------


def test_a_new_connection_costs_its_handshake_and_one_check_then_a_batch_is_one_write(
    counted: RedisStore,
) -> None:
    (answer,) = counted.batch([claim_op("first")])
    assert answer == ClaimAnswer("claimed", 1)
    select_, prepare, batch = Counting.sent
    assert b"SELECT" in select_, "redis-py's handshake: only SELECT (RESP2, no CLIENT SETINFO)"
    assert prepare.count(b"SCRIPT") == 1 and prepare.count(b"EVALSHA") == 1, "the epoch check, its script loaded"
    assert batch.count(b"EVALSHA") == 1
    Counting.sent = []
    before = counted.trips
    counted.batch([claim_op(f"k{i}") for i in range(5)] + [Admit("svc", BreakerPolicy(), "a", T0)])
    assert len(Counting.sent) == 1 and counted.trips == before + 1


def test_noscript_is_recovered_with_one_more_trip_and_nothing_runs_twice(
    counted: RedisStore, rt_redis_flushed: RedisServer
) -> None:
    counted.warm()
    rt_redis_flushed.client().script_flush()
    Counting.sent = []
    before = counted.trips
    answers = counted.batch([claim_op("n1"), claim_op("n2"), Admit("svc", BreakerPolicy(), "a", T0)])
    assert [a[0] for a in answers] == ["claimed", "claimed", "allow"]
    assert counted.trips == before + 2 and len(Counting.sent) == 2, "EVALSHAs, then SCRIPT LOADs + EVALSHAs"
    assert Counting.sent[1].count(b"SCRIPT") == 2, "only the scripts that were missing"
    (again,) = counted.batch([claim_op("n1", "b")])
    assert (again.verdict, again.token) == ("in_flight", 1), "ran once: token 1, held"


def test_warm_up_loads_every_script_so_the_first_batch_is_one_trip(rt_redis_flushed: RedisServer) -> None:
    rt_redis_flushed.client().script_flush()
    Counting.sent = []
    store = RedisStore(rt_redis_flushed.url(1), connection_class=Counting)
    store.warm()
    loaded = rt_redis_flushed.client().script_exists(*(s.sha for s in scripts().values()))
    assert all(loaded)
    Counting.sent = []
    assert store.batch([claim_op("w")])[0] == ClaimAnswer("claimed", 1)
    assert len(Counting.sent) == 1
    rt_redis_flushed.client().script_flush()
    store.warm()  # an idle connection: its scripts are loaded again
    assert all(rt_redis_flushed.client().script_exists(*(s.sha for s in scripts().values())))
    store.close()


def test_noscript_is_recovered_while_flushes_keep_coming(
    counted: RedisStore, rt_redis_flushed: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush right after our load (here: sent by us, in the same trip) is answered by
    loading again; the ops still run once."""
    counted.warm()
    rt_redis_flushed.client().script_flush()
    real = redisops.load_commands
    flushes = {"left": 1}

    def loads_then_a_flush(names: Any) -> list[Any]:
        if flushes["left"]:
            flushes["left"] -= 1
            return [*real(names), ("SCRIPT", "FLUSH")]
        return real(names)

    monkeypatch.setattr(redisops, "load_commands", loads_then_a_flush)
    before = counted.trips
    answers = counted.batch([claim_op("f1"), claim_op("f2")])
    assert answers == [ClaimAnswer("claimed", 1), ClaimAnswer("claimed", 1)]
    assert counted.trips == before + 3


def test_a_full_store_still_answers_claims_that_need_no_write(rt_redis_flushed: RedisServer) -> None:
    """At ``maxmemory`` with ``noeviction`` Redis refuses a script's first write, even a
    ``SET NX`` that would not write: a replay, an in-flight answer and a conflict are
    still given (they only read); a claim that must write fails as the store unavailable."""
    store = RedisStore(rt_redis_flushed.url(1))
    store.batch([Claim("done", "a", 1000, 60_000, "fp"), Claim("busy", "a", 60_000, 60_000, "fp")])
    store.batch([Complete("done", "a", 1, '"r"', 60_000, refresh=False)])
    admin = rt_redis_flushed.client()
    admin.config_set("maxmemory", "1")
    try:
        done, busy, conflict = store.batch(
            [Claim("done", "b", 1000, 60_000, "fp"), Claim("busy", "b", 1000, 60_000, "fp"),
             Claim("busy", "b", 1000, 60_000, "other")]
        )  # fmt: skip
        assert done == ClaimAnswer("done", 1, '"r"')
        assert busy.verdict == "in_flight" and conflict == ClaimAnswer("conflict", 1)
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError|OOM"):
            store.batch([Claim("new", "b", 1000, 60_000)])
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
    store.close()


def test_a_claims_owner_and_fingerprint_hold_no_newline(rt_redis_flushed: RedisServer) -> None:
    store = RedisStore(rt_redis_flushed.url(1))
    with pytest.raises(ValueError, match="no newline"):
        store.batch([Claim("nl", "a\nb", 1000, 60_000)])
    with pytest.raises(ValueError, match="no newline"):
        store.batch([Claim("nl", "a", 1000, 60_000, "f\np")])
    assert store.batch([Claim("nl", "a", 1000, 60_000)]) == [ClaimAnswer("claimed", 1)], "nothing was written"
    store.close()


def test_any_other_error_answer_fails_the_batch(rt_redis_flushed: RedisServer) -> None:
    admin = rt_redis_flushed.client()
    admin.config_set("maxmemory", "1")
    try:
        store = RedisStore(rt_redis_flushed.url(1))
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
            store.batch([claim_op("full")])
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
    store = RedisStore(rt_redis_flushed.url(1))
    rt_redis_flushed.client(1).rpush("rt:idem:{wrongtype}", "a list, not a record")
    with pytest.raises(StoreUnavailable, match="script 'claim' failed: .*WRONGTYPE"):
        store.batch([claim_op("ok"), claim_op("wrongtype")])
    rt_redis_flushed.client(1).set("rt:idem:{foreign}", "a string, not a record")
    with pytest.raises(StoreUnavailable, match="script 'claim' failed: .*not an idempotency record"):
        store.batch([claim_op("foreign")])
    assert rt_redis_flushed.client(1).get("rt:idem:{foreign}") == b"a string, not a record", "left as found"
    store.close()


def test_records_an_earlier_release_kept_as_hashes_are_read_then_replaced(rt_redis_flushed: RedisServer) -> None:
    """A rolling upgrade meets records written as hashes (before a record was one string):
    claims read them as before, a claim that takes one writes a string in its place, and
    a completion, renewal or release of a hash is refused (it cannot be this release's)."""
    store = RedisStore(rt_redis_flushed.url(1))
    admin = rt_redis_flushed.client(1)

    def old_record(name: str, ms: int, **fields: Any) -> None:
        admin.hset(store.idempotency_key(name), mapping={"owner": "old", "task_id": "t", **fields})
        admin.pexpire(store.idempotency_key(name), ms)

    old_record("done", 60_000, state="done", token=3, fp="", life=60_000, result='"r"')
    old_record("busy", 90_000, state="in_flight", token=2, fp="ab", life=60_000)  # 30 s of lease left
    old_record("stale", 60_000, state="in_flight", token=5, fp="", lease_until=1)  # an older lease, ended
    old_record("released", 60_000, state="released", token=4, fp="", life=60_000)
    done, busy, other, stale, released = store.batch([
        Claim("done", "new", 1000, 60_000),
        Claim("busy", "new", 1000, 60_000, fingerprint="ab"),
        Claim("busy", "new", 1000, 60_000, fingerprint="cd"),
        Claim("stale", "new", 1000, 60_000),
        Claim("released", "new", 1000, 60_000),
    ])  # fmt: skip
    assert done == ClaimAnswer("done", 3, '"r"')
    assert busy.verdict == "in_flight" and busy.token == 2 and 25_000 < busy.remaining_ms <= 30_000
    assert other == ClaimAnswer("conflict", 2)
    assert (stale, released) == (ClaimAnswer("claimed", 6), ClaimAnswer("claimed", 5)), "tokens go on"
    assert admin.type(store.idempotency_key("stale")) == b"string"
    assert store.idempotency_record("stale") == {
        "state": "in_flight", "token": "6", "owner": "new", "life": "60000", "fp": "", "task_id": "", "result": "",
    }  # fmt: skip
    assert store.batch([
        Complete("busy", "old", 2, '"x"', 60_000), Renew("busy", "old", 2, 1000, 60_000), Release("busy", "old", 2, 60_000),
    ]) == [CompleteAnswer(False, "in_flight"), False, False]  # fmt: skip
    assert store.idempotency_record("done") == {
        "owner": "old", "task_id": "t", "state": "done", "token": "3", "fp": "", "life": "60000", "result": '"r"',
    }  # fmt: skip
    (handed,) = store.batch([Claim("busy", "retry", 1000, 60_000, fingerprint="ab", handoff="old")])
    assert handed == ClaimAnswer("claimed", 3), "a retry of the old owner's execution continues it"
    store.close()
    admin.close()


def test_a_record_keeps_a_task_id_with_newlines_and_a_result_with_them(rt_redis_flushed: RedisServer) -> None:
    """Fields are newline-joined with the result last: a task id loses its newlines, a
    result keeps whatever it holds."""
    store = RedisStore(rt_redis_flushed.url(1))
    assert store.batch([Claim("nl", "a", 1000, 60_000, "fp", task_id="x\ny")]) == [ClaimAnswer("claimed", 1)]
    assert store.batch([Complete("nl", "a", 1, '"a"\n"b"', 60_000, refresh=False)]) == [CompleteAnswer(True)]
    assert store.idempotency_record("nl") == {
        "state": "done", "token": "1", "owner": "a", "life": "60000", "fp": "fp", "task_id": "x y", "result": '"a"\n"b"',
    }  # fmt: skip
    assert store.batch([Claim("nl", "b", 1000, 60_000, "fp")]) == [ClaimAnswer("done", 1, '"a"\n"b"')]
    store.close()


# -- timeouts and broken connections ----------------------------------------------------------


def test_a_slow_network_still_answers_within_two_socket_timeouts(rt_redis_flushed: RedisServer) -> None:
    """A new connection on a slow network: SELECT, the connect check and the batch, three
    round trips of 0.6 s, fit in the two timeouts a batch may take."""
    RedisStore(rt_redis_flushed.url(1)).warm()  # the scripts are there
    with FaultProxy(rt_redis_flushed.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
        proxy.latency(300)
        started = time.monotonic()
        assert store.batch([claim_op("slow")]) == [ClaimAnswer("claimed", 1)]
        assert time.monotonic() - started <= 2.2
        store.close()


def test_a_noscript_recovery_is_not_started_after_one_timeout(rt_redis_flushed: RedisServer) -> None:
    """Slow network, new connection, flushed scripts: SELECT, the check and the EVALSHA
    took 1.8 s, more than one timeout, so the recovery trip is not started; the next
    batch on the connection now open recovers (two trips, 1.2 s)."""
    with FaultProxy(rt_redis_flushed.port) as proxy:
        rt_redis_flushed.client().script_flush()
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
        proxy.latency(300)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="too slow"):
            store.batch([claim_op("flushed")])
        assert time.monotonic() - started <= 2.0
        started = time.monotonic()
        assert store.batch([claim_op("flushed")]) == [ClaimAnswer("claimed", 1)]
        assert time.monotonic() - started <= 2.0
        store.close()


def test_a_silent_store_is_given_up_within_two_socket_timeouts(rt_redis_flushed: RedisServer) -> None:
    with FaultProxy(rt_redis_flushed.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=0.5")
        store.batch([claim_op("before")])
        proxy.blackhole(10)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="[Tt]imeout"):
            store.batch([claim_op("silent")])
        assert time.monotonic() - started <= 1.0
        proxy.clear()
        fresh = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=0.5")
        assert fresh.batch([claim_op("after")]) == [ClaimAnswer("claimed", 1)]
        store.close()
        fresh.close()


def test_a_connection_that_timed_out_is_never_reused_and_the_batch_is_not_sent_again(
    rt_redis_flushed: RedisServer,
) -> None:
    """The reply was late, not lost: the script ran. The next batch must read its own
    answers (the late ones died with the connection), and nothing was re-sent."""
    with FaultProxy(rt_redis_flushed.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=0.3")
        store.warm()
        proxy.latency(700)
        with pytest.raises(StoreUnavailable):
            store.batch([claim_op("late")])
        proxy.clear()
        time.sleep(1.0)
        assert store.batch([claim_op("next", "b")]) == [ClaimAnswer("claimed", 1)]
        (late,) = store.batch([claim_op("late", "b")])
        assert (late.verdict, late.token) == ("in_flight", 1) and 0 < late.remaining_ms <= 1000, late
        store.close()


def test_a_reply_cut_in_half_fails_the_batch_and_the_next_one_is_clean(rt_redis_flushed: RedisServer) -> None:
    with FaultProxy(rt_redis_flushed.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
        store.warm()
        proxy.cut_replies(1.0)
        with pytest.raises(StoreUnavailable):
            store.batch([claim_op(f"cut{i}") for i in range(20)])
        proxy.clear()
        assert store.batch([claim_op("whole")]) == [ClaimAnswer("claimed", 1)]
        store.close()


def test_signals_during_a_silent_store_do_not_extend_the_wait(rt_redis_flushed: RedisServer) -> None:
    """A signal interrupts a blocked read; the read then waits only for the time left."""
    with FaultProxy(rt_redis_flushed.port) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
        store.batch([claim_op("sig0")])
        ticks: list[float] = []
        previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(time.monotonic()))
        signal.setitimer(signal.ITIMER_REAL, 0.3, 0.3)
        proxy.blackhole(10)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable):
                store.batch([claim_op("sig1")])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)
            proxy.clear()
            store.close()
        assert len(ticks) >= 2, "the signals did arrive during the wait"
        assert time.monotonic() - started <= 2.0


def test_under_gevent_many_greenlets_share_the_store_and_a_silent_one_is_given_up(
    rt_redis_flushed: RedisServer,
) -> None:
    pytest.importorskip("gevent")
    with FaultProxy(rt_redis_flushed.port) as proxy:
        script = textwrap.dedent(f"""
            from gevent import monkey; monkey.patch_all()
            import sys, time, gevent
            from resilient_tasks.errors import StoreUnavailable
            from resilient_tasks.store.protocol import Claim
            from resilient_tasks.store.redis import RedisStore
            store = RedisStore("redis://127.0.0.1:{proxy.port}/1?socket_timeout=1")
            def op(n):
                return [Claim(f"g{{n}}", "a", 1000, 60000, now_ms=1)]
            jobs = [gevent.spawn(store.batch, op(n)) for n in range(20)]
            gevent.joinall(jobs, raise_error=True)
            assert all(job.value[0].verdict == "claimed" for job in jobs), [job.value for job in jobs]
            print("READY", flush=True)
            sys.stdin.readline()
            started = time.monotonic()
            try:
                store.batch(op(99))
                print("ANSWERED", flush=True)
            except StoreUnavailable:
                print("GAVE_UP", round(time.monotonic() - started, 2), flush=True)
        """)
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            ready, _, _ = select.select([child.stdout], [], [], 60)
            assert ready, "the greenlets' batches never finished"
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


def test_connections_stay_few_whatever_the_threads_and_survive_a_server_side_close() -> None:
    with RedisServer() as server:  # its own server: only this store's connections on it
        store = RedisStore(server.url(1))
        admin = server.client()
        errors: list[BaseException] = []

        def one_batch(n: int) -> None:
            try:
                store.batch([claim_op(f"t{n}")])
            except BaseException as exc:
                errors.append(exc)

        for n in range(150):  # one after another: a new thread each time
            thread = threading.Thread(target=one_batch, args=(n,))
            thread.start()
            thread.join()
        burst = [threading.Thread(target=one_batch, args=(1000 + n,)) for n in range(16)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        assert errors == []
        ours = [c for c in admin.client_list() if int(c["db"]) == 1]
        assert len(ours) <= 16, "no connection per thread left behind"
        admin.client_kill_filter(_type="normal", skipme=True)  # a proxy or failover reset
        assert store.batch([claim_op("after-kill")]) == [ClaimAnswer("claimed", 1)]
        store.close()
        admin.close()


def test_a_forked_child_opens_its_own_connections(rt_redis_flushed: RedisServer) -> None:
    store = RedisStore(rt_redis_flushed.url(1))
    store.batch([claim_op("parent")])
    pid = os.fork()
    if pid == 0:  # the child: the parent's socket is not ours to read
        code = 1
        try:
            code = 0 if store.batch([claim_op("child")]) == [ClaimAnswer("claimed", 1)] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.batch([claim_op("parent", "b")])[0].verdict == "in_flight"
    store.close()


# -- URLs, TLS, ACL, errors --------------------------------------------------------------------

#: The documented ACL line: our commands, our prefix, nothing else.
ACL_RULES = [
    "on", ">s3cret-pw", "resetkeys", "~rt:*", "resetchannels", "-@all",
    "+@connection", "+evalsha", "+script|load", "+time", "+scan", "+hgetall",
    "+get", "+hmget", "+hget", "+hset", "+hdel", "+hincrby", "+hkeys", "+hexists",
    "+pexpire", "+pttl", "+exists", "+del", "+set",
]  # fmt: skip


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "2", "-extfile", str(folder / "san.cnf"), "-out", str(cert))  # fmt: skip
    port = free_port()
    server = RedisServer(args=["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                               "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"])  # fmt: skip
    with server:
        server.client().execute_command("ACL", "SETUSER", "rt-worker", *ACL_RULES)
        yield server, port, ca


def test_a_tls_store_with_an_acl_user_runs_every_op_on_new_connections_too(
    tls_server: tuple[RedisServer, int, Path],
) -> None:
    """TLS 1.3 servers send session tickets after the handshake; with the hiredis parser
    redis-py 8 takes them for unread data on a connection that made no round trip yet
    ("Connection not ready"). Every new connection of ours makes one (the connect
    check), which reads them: fresh connections on db 0 work, with hiredis."""
    assert redis.utils.HIREDIS_AVAILABLE, "the parser this is about"
    _, port, ca = tls_server
    url = f"rediss://rt-worker:s3cret-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    for n in range(5):  # a new store each time: every batch on a brand-new TLS connection
        store = RedisStore(url, socket_timeout=2)
        store.ping()
        answers = store.batch([
            claim_op(f"tls{n}"), Complete(f"tls{n}", "a", 1, "r", 60_000, T0),
            Record("svc", BreakerPolicy(), "a", fail=1, now_ms=T0), CacheGet("x", now_ms=T0),
        ])  # fmt: skip
        assert answers[:2] == [ClaimAnswer("claimed", 1), CompleteAnswer(True)]
        assert store.breakers()[0].downstream == "svc" and store.now_ms() > 0
        store.close()
    store = RedisStore(url, socket_timeout=2)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda n=n: results.append(store.batch([claim_op(f"p{n}")])))
               for n in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r[0].verdict for r in results) == ["claimed"] * 8
    record = store.idempotency_record("p0")  # an operator's read, within the documented ACL line
    assert record is not None and record["state"] == "in_flight" and record["token"] == "1"
    assert store.check_eviction() is None, "CONFIG is refused to this user: nothing to learn"
    store.close()


def test_plaintext_to_a_tls_port_and_a_wrong_password_are_store_unavailable(
    tls_server: tuple[RedisServer, int, Path],
) -> None:
    _, port, ca = tls_server
    with pytest.raises(StoreUnavailable):
        RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=1).ping()
    wrong = RedisStore(f"rediss://rt-worker:not-the-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}", socket_timeout=1)
    with pytest.raises(StoreUnavailable, match="(?i)invalid username-password|WRONGPASS") as caught:
        wrong.batch([claim_op("x")])
    _assert_no_secret(caught.value, "not-the-pw")


def test_a_user_without_the_rights_gets_store_unavailable(rt_redis_flushed: RedisServer) -> None:
    admin = rt_redis_flushed.client()
    admin.execute_command("ACL", "SETUSER", "elsewhere", "on", ">pw-elsewhere", "resetkeys", "~other:*",
                          "-@all", "+@connection", "+evalsha", "+script|load", "+hmget", "+hset", "+set",
                          "+pexpire", "+pttl", "+hincrby", "+hdel", "+time")  # fmt: skip
    try:
        url = f"redis://elsewhere:pw-elsewhere@127.0.0.1:{rt_redis_flushed.port}/1"
        with pytest.raises(StoreUnavailable, match="NoPermissionError") as caught:
            RedisStore(url).batch([claim_op("x")])
        _assert_no_secret(caught.value, "pw-elsewhere")
    finally:
        admin.execute_command("ACL", "DELUSER", "elsewhere")
        admin.close()


def test_no_password_appears_in_any_message() -> None:
    port = free_port()
    store = RedisStore(f"redis://user:hunter2-secret@127.0.0.1:{port}/0", socket_timeout=0.5)
    for call in (store.ping, store.now_ms, store.breakers, lambda: store.batch([claim_op("x")])):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        _assert_no_secret(caught.value, "hunter2-secret")
        assert "127.0.0.1" in str(caught.value)
    assert "hunter2" not in repr(store) and "hunter2" not in store.where
    with pytest.raises(ValueError) as bad:
        RedisStore("redis://user:hunter2-secret@127.0.0.1:notaport/0")
    _assert_no_secret(bad.value, "hunter2-secret")
    assert redact("sentinel://u:pw@h:1,h:2/0 and rediss://:pw2@x:3/1", ["pw2"]) == (
        "sentinel://***@h:1,h:2/0 and rediss://***@x:3/1"
    )


def _assert_no_secret(error: BaseException, secret: str) -> None:
    seen: BaseException | None = error
    while seen is not None:
        assert secret not in str(seen) and secret not in repr(seen.args), seen
        seen = seen.__cause__ or seen.__context__


def test_unreachable_hostile_prefix_and_eviction(rt_redis_flushed: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(StoreUnavailable, match="failed"):
        RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5).batch([claim_op("x")])
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://127.0.0.1:1/0", prefix="a{b}")
    admin = rt_redis_flushed.client()
    admin.config_set("maxmemory-policy", "volatile-lru")
    try:
        with caplog.at_level("WARNING"):
            assert RedisStore(rt_redis_flushed.url(1)).check_eviction() == "volatile-lru"
        assert "may evict idempotency records" in caplog.text
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.close()
    assert RedisStore(rt_redis_flushed.url(1)).check_eviction() == "noeviction"


def test_unix_sockets_and_resp3(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    with RedisServer(args=["--unixsocket", str(path), "--unixsocketperm", "700"]) as server:
        for url in (f"unix://{path}?db=2", f"redis://127.0.0.1:{server.port}/3?protocol=3"):
            store = RedisStore(url)
            first, second = store.batch([claim_op("u"), claim_op("u", "b")])
            assert first == ClaimAnswer("claimed", 1)
            assert (second.verdict, second.token) == ("in_flight", 1) and 900 < second.remaining_ms <= 1000
            store.close()


def test_sentinel_urls_are_parsed() -> None:
    sentinels, options = parse_sentinel_url(
        "sentinel://user:p%40ss@10.0.0.1:26379,[::1]:26380,sentinel-c/2?service_name=main&socket_timeout=0.5&ssl=true"
    )
    assert sentinels == [("10.0.0.1", 26379), ("::1", 26380), ("sentinel-c", 26379)]
    assert options == {"username": "user", "password": "p@ss", "db": 2, "service_name": "main",
                       "socket_timeout": 0.5, "ssl": True}  # fmt: skip
    with pytest.raises(ValueError, match="service_name"):
        RedisStore("sentinel://127.0.0.1:1/0")


def test_a_value_that_cannot_be_packed_fails_its_batch_as_the_store_being_unavailable(
    rt_redis_flushed: RedisServer,
) -> None:
    """The guards handle ``StoreUnavailable`` (fail open, defer): a bad value must reach
    them as one, and the connection must stay usable."""
    store = RedisStore(rt_redis_flushed.url(1))
    bad: Any = object()
    with pytest.raises(StoreUnavailable, match="could not be packed"):
        store.batch([Claim("r", "o", 1000, 60_000, handoff=bad)])
    assert store.batch([claim_op("after-bad")]) == [ClaimAnswer("claimed", 1)]
    store.close()


# -- store amnesia -----------------------------------------------------------------------------


def test_a_restart_that_lost_the_data_fails_claims_closed_for_the_window() -> None:
    with RedisServer() as server:
        first_start = RedisStore(server.url(1), amnesia_window_ms=lambda: 1500)
        assert first_start.batch([claim_op("a")]) == [ClaimAnswer("claimed", 1)]
        assert first_start.amnesia_detections == 0, "a fleet's first start is not amnesia"
        second = RedisStore(server.url(1))
        assert second.batch([claim_op("b")]) == [ClaimAnswer("claimed", 1)] and second.amnesia_detections == 0

        server.kill()  # no persistence: every claim is gone
        with pytest.raises(StoreUnavailable):
            first_start.batch([claim_op("c")])
        server.start()
        answers = first_start.batch([claim_op("a", "again"), Admit("svc", BreakerPolicy(), "x", T0)])
        assert answers[0].verdict == "amnesia" and 1000 < answers[0].remaining_ms <= 1500, answers
        assert answers[1].verdict == "allow", "other ops still run"
        assert first_start.amnesia_detections == 1
        assert server.client(1).exists("rt:idem:{a}") == 0, "the claim did not run"

        late = RedisStore(server.url(1))  # a process started after the restart
        (answer,) = late.batch([claim_op("a", "late")])
        assert answer.verdict == "amnesia" and late.amnesia_detections == 0, "told by the marker"

        time.sleep(1.6)
        assert first_start.batch([claim_op("a", "after")]) == [ClaimAnswer("claimed", 1)]
        assert late.batch([claim_op("b", "after")]) == [ClaimAnswer("claimed", 1)]
        for store in (first_start, second, late):
            store.close()


def test_a_flushed_store_noticed_by_a_new_connection_is_amnesia_too(rt_redis_flushed: RedisServer) -> None:
    store = RedisStore(rt_redis_flushed.url(1), amnesia_window_ms=5_000)
    store.batch([claim_op("k")])
    rt_redis_flushed.client().flushall()
    # checked when a connection is made, not in every claim: the open one does not notice
    assert store.batch([claim_op("k", "b")]) == [ClaimAnswer("claimed", 1)]
    rt_redis_flushed.client().client_kill_filter(_type="normal", skipme=True)
    (answer,) = store.batch([claim_op("k", "c")])
    assert answer.verdict == "amnesia" and store.amnesia_detections == 1
    store.close()


def test_without_the_guard_claims_run_after_a_restart() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url(1), amnesia_guard=False)
        store.batch([claim_op("a")])
        server.kill()
        server.start()
        assert store.batch([claim_op("a", "b")]) == [ClaimAnswer("claimed", 1)]
        assert server.client(1).keys("rt:meta:*") == []
        store.close()


# -- Redis Cluster -----------------------------------------------------------------------------


def test_a_cluster_batch_spreads_over_the_masters_and_recovers_noscript_on_each(
    cluster: ClusterServers,
) -> None:
    store = RedisStore(cluster.url, cluster=True, prefix="spread")
    ops = [claim_op(f"s{i}") for i in range(24)]
    assert store.batch(ops) == [ClaimAnswer("claimed", 1)] * 24
    used = [node.client().dbsize() for node in cluster.nodes]
    assert sum(1 for n in used if n) == 3, used
    for node in cluster.nodes:
        node.client().script_flush()
    before = store.trips
    answers = store.batch([claim_op(f"s{i}", "b") for i in range(24)])
    assert [a.verdict for a in answers] == ["in_flight"] * 24 and store.trips == before + 2
    store.close()


# -- a thread's connection ---------------------------------------------------------------------


def _connections_made(server: RedisServer) -> int:
    return int(server.client(0).info("stats")["total_connections_received"])


def test_a_thread_keeps_its_connection_and_gives_it_back_when_it_ends() -> None:
    """Between batches a thread keeps its connection (no pool check each time); a
    thread that ends gives it back, so short-lived threads do not each open one."""
    with RedisServer() as server:
        store = RedisStore(server.url(1))
        store.batch([claim_op("t-main")])
        before = _connections_made(server)
        for i in range(50):
            store.batch([claim_op(f"t-main-{i}")])
        assert _connections_made(server) == before + 1, "the same connection (+1: the check)"
        time.sleep(redisops.HOLD_SECONDS + 0.1)
        store.batch([claim_op("t-main-late")])  # given back to the pool, taken again: the same one
        assert _connections_made(server) == before + 2, "no new connection (+1: this check)"
        before += 1

        def one(n: int) -> None:
            store.batch([claim_op(f"t-{n}")])

        for n in range(30):
            thread = threading.Thread(target=one, args=(n,))
            thread.start()
            thread.join()
        # each thread ended and gave its connection back: the next one took it again
        assert _connections_made(server) <= before + 1 + 2
        connected = int(server.client(0).info("clients")["connected_clients"])
        assert connected <= 1 + 2 + 1, connected  # this thread's, one given back, (one spare), the check's
        store.close()


def test_a_held_connection_is_left_alone_by_a_forked_child() -> None:
    """A child of a fork (a prefork pool process) makes its own connection; the parent's
    held one still works afterwards."""
    import multiprocessing

    with RedisServer() as server:
        store = RedisStore(server.url(1))
        assert store.batch([claim_op("f-parent")]) == [ClaimAnswer("claimed", 1)]
        context = multiprocessing.get_context("fork")
        answers: Any = context.Queue()
        before = _connections_made(server)

        def child() -> None:
            answers.put(store.batch([claim_op("f-child"), claim_op("f-parent", "c")]))

        process = context.Process(target=child)
        process.start()
        process.join(20)
        (mine, theirs) = answers.get(timeout=5)
        assert mine == ClaimAnswer("claimed", 1) and theirs.verdict == "in_flight"
        assert _connections_made(server) >= before + 1 + 1, "the child opened its own (+1: this check)"
        assert store.batch([claim_op("f-parent-2")]) == [ClaimAnswer("claimed", 1)], "the parent's is intact"
        store.close()
