"""TLS (rediss://) and an ACL user confined to our prefix, against real redis-servers."""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.errors import StoreUnavailable
from resilient_tasks.store import RedisStore
from resilient_tasks.store.protocol import Claim
from resilient_tasks.testing import RedisServer, free_port, in_process_worker

#: The ACL line documented in docs/RELIABILITY.md: our commands, our prefix, nothing else.
ACL_RULES = [
    "on", ">s3cret-pw", "resetkeys", "~rt:*", "resetchannels", "-@all",
    "+@connection", "+evalsha", "+script|load", "+time", "+scan", "+hgetall",
    # commands our Lua scripts call (Redis checks them against the caller's ACL)
    "+get", "+hmget", "+hget", "+hset", "+hdel", "+hincrby", "+hkeys", "+hexists",
    "+pexpire", "+pttl", "+exists", "+del", "+set",
]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(cert))
    return key, cert


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = make_ca(folder, "test-ca")
    _, wrong_ca = make_ca(folder, "other-ca")
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(cert))
    tls_port = free_port()
    server = RedisServer(args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca_cert), "--tls-auth-clients", "no",
    ])
    with server:
        yield server, tls_port, ca_cert, wrong_ca


def test_rediss_with_the_right_ca_works(tls_server: tuple[RedisServer, int, Path, Path]) -> None:
    _, port, ca, _ = tls_server
    store = RedisStore(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    store.ping()
    (answer,) = store.batch([Claim("tls", "o", 1000, 60000, task_id="t")])
    assert answer.verdict == "claimed"
    # One TLS connection serves call after call: the session tickets a TLS 1.3 server
    # sends after the handshake are not taken for a dead or dirty connection.
    connections = store.client.info("stats")["total_connections_received"]
    for n in range(20):
        (answer,) = store.batch([Claim(f"tls{n}", "o", 1000, 60000, task_id="t")])
        assert answer.verdict == "claimed"
    # (the INFO calls take a pooled connection too: the same one, when nothing reconnects)
    assert store.client.info("stats")["total_connections_received"] == connections, "no reconnect per call"
    store.close()


def test_plaintext_and_a_wrong_ca_are_refused(tls_server: tuple[RedisServer, int, Path, Path]) -> None:
    _, port, _, wrong_ca = tls_server
    plaintext = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=1)
    with pytest.raises(StoreUnavailable):
        plaintext.ping()
    wrong = RedisStore(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={wrong_ca}&ssl_cert_reqs=required",
                       socket_timeout=1)
    with pytest.raises(StoreUnavailable, match="(?i)certificate"):
        wrong.ping()


@pytest.fixture
def acl_url(rt_redis_flushed: RedisServer) -> Iterator[str]:
    admin = rt_redis_flushed.client()
    admin.execute_command("ACL", "SETUSER", "rt-worker", *ACL_RULES)
    try:
        yield f"redis://rt-worker:s3cret-pw@127.0.0.1:{rt_redis_flushed.port}/1"
    finally:
        admin.execute_command("ACL", "DELUSER", "rt-worker")
        admin.close()


def test_acl_user_is_confined_to_the_prefix(acl_url: str) -> None:
    client = redis.Redis.from_url(acl_url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("someone-else:key", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushdb()


def test_acl_user_runs_the_idempotency_scenario(acl_url: str, app_factory: Callable[..., Celery]) -> None:
    app = app_factory()
    rt.install(app, redis_url=acl_url)
    effects: Counter[str] = Counter()
    lock = threading.Lock()

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        downstream="ledger",
        idempotency=rt.IdempotencyPolicy(key=("job",), lease=10),
    ))
    def apply(self: rt.ResilientTask, job: str) -> str:
        with lock:
            effects[job] += 1
        return job

    jobs = 1000
    with in_process_worker(app, concurrency=4):
        results = [apply.delay(f"j{n}") for n in range(jobs) for _ in range(2)]
        answers = [r.get(timeout=60) for r in results]
    assert sorted(set(answers)) == sorted(f"j{n}" for n in range(jobs))
    assert effects == {f"j{n}": 1 for n in range(jobs)}
