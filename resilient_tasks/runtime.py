"""What ``install`` sets up for one Celery app: settings, the store, the publish hook.

One ``Runtime`` per app, found through ``runtime_for(app)``. It holds no per-call state.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import signals

from . import policyfile
from .call import DEADLINE_HEADER, current_deadline
from .errors import PolicyError, StoreUnavailable
from .heartbeat import Heartbeat
from .policy import BreakerPolicy
from .store.memory import MemoryStore
from .store.protocol import Admission, Store
from .store.redis import RedisStore
from .store.urls import redact
from .telemetry import MetricsSink, default_sinks

if TYPE_CHECKING:
    from celery import Celery

    from .policy import TaskPolicy
    from .task import ResilientTask

__all__ = ["Runtime", "install", "runtime_for"]

log = logging.getLogger(__name__)

REDIS_URL_ENV = "RESILIENT_TASKS_REDIS_URL"
POLICIES_ENV = "RESILIENT_TASKS_POLICIES"
HMAC_ENV = "RESILIENT_TASKS_HMAC_KEY"


def _secret(value: str | bytes | None) -> bytes | None:
    if value is None or value == "":
        return None
    return value.encode() if isinstance(value, str) else value


_RUNTIMES: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()
_PICKLE = {"pickle", "application/x-python-serialize"}
_REDIS_BROKERS = ("redis", "rediss", "sentinel", "redis+socket")
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
DEFAULT_BREAKER = BreakerPolicy()


class Runtime:
    """The per-app wiring: the store (created lazily, per process), clock and limits."""

    def __init__(
        self,
        app: Celery,
        *,
        redis_url: str | None,
        prefix: str = "rt",
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        max_result_bytes: int = 512 * 1024,
        redis_options: dict[str, Any] | None = None,
        epoch_guard: bool = True,
        cluster: bool = False,
        hmac_key: bytes | None = None,
    ) -> None:
        self.app = app
        self.hmac_key = hmac_key
        self.cluster = cluster
        self.redis_url = redis_url
        self.prefix = prefix
        self.clock = clock
        self.max_result_bytes = max_result_bytes
        self._redis_options = dict(redis_options or {})
        self._store = store
        self.heartbeat = Heartbeat(lambda: self.store)
        self._lock = threading.RLock()
        self.counters: Counter[tuple[str, str]] = Counter()
        self.refusing: dict[str, tuple[float, int]] = {}
        self.epoch_guard = epoch_guard
        self.sinks: list[MetricsSink] = default_sinks()
        self.policies_path: str | None = None
        self.policy_file: policyfile.PolicyFile | None = None
        self.reload_interval = float(os.environ.get("RESILIENT_TASKS_RELOAD_INTERVAL", "1.0"))
        self._resolved: dict[str, tuple[TaskPolicy, policyfile.Resolved]] = {}
        self._next_check = 0.0
        self._refused_mtime: float | None = None
        #: This process's stand-in for breakers and retry budgets while the store is
        #: unreachable (fail-open): the same operations, in memory.
        self.local = MemoryStore(clock)

    def longest_lease(self) -> float:
        """The longest idempotency lease of this app's tasks (how long an old run may live)."""
        from .guards.idempotency import DEFAULT_LEASE, task_lease

        longest = 0.0
        for task in list(self.app.tasks.values()):
            idem = getattr(getattr(task, "policy", None), "idempotency", None)
            if idem is not None:
                longest = max(longest, task_lease(task, self.app, idem))
        return longest or DEFAULT_LEASE

    def now_ms(self) -> int:
        """Time for the scripts: 0 lets Redis use its own clock (one clock for the fleet);
        an injected clock (tests, simulations) is sent explicitly."""
        if self.clock is time.time:
            return 0
        return int(self.clock() * 1000)

    def count(self, event: str, downstream: str = "") -> None:
        """Count an outcome in this process (exported by the telemetry layer)."""
        self.counters[(event, downstream)] += 1

    def breaker_policy(self, name: str, task_policy: TaskPolicy) -> BreakerPolicy:
        """The breaker policy for ``name``.

        The task's own downstream: its resolved policy (file layers already merged).
        Another name (``self.downstream(name)``): ``[downstreams.name]`` of the file when
        there is one, else the task's breaker policy, else the default."""
        if name == task_policy.downstream and task_policy.breaker is not None:
            return task_policy.breaker
        from_file = self.policy_file.downstreams.get(name) if self.policy_file else None
        return from_file or task_policy.breaker or DEFAULT_BREAKER

    @property
    def store(self) -> Store:
        """The shared store; a fork gets its own connections (redis-py checks the pid)."""
        if self._store is not None:
            return self._store
        with self._lock:
            return self._make_store()

    def _make_store(self) -> Store:
        if self._store is None:
            if not self.redis_url:
                raise PolicyError(
                    "install.redis_url",
                    f"a task needs the Redis store: call resilient_tasks.install(app, "
                    f"redis_url=...) or set {REDIS_URL_ENV}",
                )
            store = RedisStore(
                self.redis_url,
                prefix=self.prefix,
                cluster=self.cluster,
                amnesia_guard=self.epoch_guard,
                amnesia_window_ms=lambda: int(self.longest_lease() * 1000),
                **self._redis_options,
            )
            # Off the task's path: a slow or refused CONFIG GET must not delay a task.
            threading.Thread(target=store.check_eviction, name="rt-eviction-check", daemon=True).start()
            self._store = store
        return self._store

    # -- the worker policies file -------------------------------------------------------

    def load_policies(self, path: str | os.PathLike[str]) -> None:
        """Load and fully validate the policies file (raises ``PolicyFileError``)."""
        self.policies_path = str(path)
        self.policy_file = policyfile.load(self.policies_path)
        self._resolved.clear()
        self._next_check = time.monotonic() + self.reload_interval

    def note_admission(self, downstream: str, admission: Admission) -> None:
        """Remember how ``downstream`` answered last, so the next call's ``begin`` trip can
        fetch a fallback in advance while it refuses calls (one round trip, not two)."""
        if admission.allowed:
            self.refusing.pop(downstream, None)
        else:
            until = time.monotonic() + max(1.0, admission.retry_after_ms / 1000.0)
            self.refusing[downstream] = (until, int(admission.consecutive_failures))

    def refusal_hint(self, downstream: str | None) -> int | None:
        """The failure count last seen for a downstream believed to refuse calls now."""
        if downstream is None:
            return None
        hint = self.refusing.get(downstream)
        if hint is None or hint[0] < time.monotonic():
            return None
        return hint[1]

    def warm_store(self) -> None:
        """Connect and load the scripts in the background when a worker starts, so its
        first task pays one round trip, not a connection set-up and a NOSCRIPT."""
        if not self.redis_url:
            return

        def warm() -> None:
            try:
                self.store.warm()
            except PolicyError as exc:
                log.error("%s", exc)

        threading.Thread(target=warm, name="rt-store-warm-up", daemon=True).start()

    def store_timeout(self) -> float:
        """The store's socket timeout: how long one round trip may block a worker."""
        timeout = getattr(self.store, "socket_timeout", None)
        return float(timeout) if timeout else 5.0

    def policy_for(self, task: ResilientTask) -> TaskPolicy:
        """The effective policy of ``task``: file layers around the code's policy."""
        self._maybe_reload()
        resolved = self._resolved.get(task.name)
        if resolved is None or resolved[0] is not task.policy:
            found = policyfile.resolve(task.name, task.policy, self.policy_file)
            resolved = self._resolved[task.name] = (task.policy, found)
        return resolved[1].policy

    def resolved(self, name: str, code: TaskPolicy) -> policyfile.Resolved:
        """The effective policy and the layer that set each field (for ``policies``)."""
        return policyfile.resolve(name, code, self.policy_file)

    def _maybe_reload(self) -> None:
        """At most once per ``reload_interval``: stat the file, apply what may change live."""
        if self.policies_path is None or self.policy_file is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.reload_interval
        try:
            mtime = os.stat(self.policies_path).st_mtime
        except OSError as exc:
            log.error("policies file %s unreadable; keeping the last good one: %s", self.policies_path, exc)
            return
        if mtime in (self.policy_file.mtime, self._refused_mtime):
            return
        try:
            new = policyfile.load(self.policies_path)
        except PolicyError as exc:
            self._refused_mtime = mtime
            self.count("policy_reload_refused")
            log.error("policies file change NOT applied (the last good file stays in force):\n%s", exc)
            return
        live, refused = policyfile.merge_live(self.policy_file, new)
        previous_switches = self.policy_file.switches
        self.policy_file = live
        self._resolved.clear()
        self.count("policy_reload")
        log.warning("policies file %s reloaded: breaker settings and switches applied", self.policies_path)
        if refused:
            self.count("policy_reload_partial")
            log.warning("not applied live, restart the workers to apply: %s", "; ".join(refused))
        changed = {k: v for k, v in live.switches.items() if previous_switches.get(k) != v}
        self.apply_file_switches(changed)

    def apply_file_switches(self, switches: dict[str, str] | None = None) -> None:
        """Write the file's switches to Redis (only values the file changed take effect)."""
        from .switches import set_switch

        if self.policy_file is None:
            return
        for name, mode in (self.policy_file.switches if switches is None else switches).items():
            try:
                set_switch(self, name, mode, source="file")
            except StoreUnavailable as exc:
                log.error("could not apply switch %s=%s from the policies file: %s", name, mode, exc)


def stamp_deadline(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: the earliest of the message's deadline, the running task's
    and the task's own policy deadline (when an installed app knows the task)."""
    if headers is None:
        return
    name = headers.get("task") or sender
    candidates = [float(d) for d in (headers.get(DEADLINE_HEADER), current_deadline.get()) if d]
    if isinstance(name, str):
        for runtime in list(_RUNTIMES.values()):
            task = runtime.app._tasks.get(name)  # no finalize from inside a publish
            own = getattr(getattr(task, "policy", None), "deadline", None)
            if own is not None:
                candidates.append(runtime.clock() + float(own))
                break
    if candidates:
        headers[DEADLINE_HEADER] = min(candidates)


def _running_celery_cli() -> bool:
    """True inside ``celery ...`` (where a clean message beats Celery's traceback dump)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    return argv0 == "celery" or sys.argv[0].endswith(os.path.join("celery", "__main__.py"))


def runtime_for(app: Celery) -> Runtime:
    """The app's runtime; an app that never called ``install`` gets one from the env."""
    runtime = _RUNTIMES.get(app)
    if runtime is None:
        runtime = install(app, os.environ.get(REDIS_URL_ENV), _configure=False)
    return runtime


def _check_serializers(app: Celery) -> None:
    conf = app.conf
    for setting in ("accept_content", "result_accept_content"):
        values = {str(v) for v in (conf.get(setting) or ())}
        if values & _PICKLE:
            raise PolicyError(
                setting,
                "pickle is refused: a message that can run code on unpickling lets anyone "
                "who can write to the broker run code on every worker; use ['json']",
            )
    for setting in ("task_serializer", "result_serializer", "event_serializer"):
        if str(conf.get(setting)) in _PICKLE:
            raise PolicyError(setting, "pickle is refused; use 'json'")


def _largest_wait(app: Celery, tasks: list[Any]) -> tuple[float, str]:
    """The longest countdown or lease any of ``tasks`` may schedule."""
    from .guards.idempotency import task_lease
    from .task import ResilientTask

    largest, what = 0.0, ""
    for task in tasks:
        policy = getattr(task, "policy", None)
        if (
            not (
                isinstance(task, ResilientTask)
                or (isinstance(task, type) and issubclass(task, ResilientTask))
            )
            or policy is None
        ):
            continue
        name = task.name
        waits = []
        if policy.retry is not None:
            waits.append((policy.retry.cap, f"{name}: RetryPolicy.cap"))
        if policy.idempotency is not None:
            lease = task_lease(task, app, policy.idempotency)
            waits.append((lease, f"{name}: IdempotencyPolicy.lease"))
        if policy.breaker is not None or policy.downstream is not None:
            breaker = policy.breaker or DEFAULT_BREAKER
            # a deferral lands at the half-open time plus up to 5 s of jitter
            longest_open = (breaker.open_for_max or breaker.open_for) + 5.0
            waits.append((longest_open, f"{name}: BreakerPolicy.open_for (+5 s jitter)"))
        for value, label in waits:
            if value > largest:
                largest, what = value, label
    return largest, what


def check_visibility_timeout(app: Celery, tasks: list[Any] | None = None) -> None:
    """Refuse countdowns, leases or deferrals that the Redis broker would redeliver early.

    The Redis transport re-delivers an unacked message after ``visibility_timeout``; an
    ETA or countdown beyond it runs twice (Celery issues #2599, #3270, #4400).
    """
    url = str(app.conf.broker_url or "")
    if url.split("://", 1)[0] not in _REDIS_BROKERS:
        return
    options = app.conf.broker_transport_options or {}
    timeout = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
    if tasks is None:
        tasks = list(app.tasks.values())
    largest, what = _largest_wait(app, tasks)
    if largest and timeout <= largest:
        raise PolicyError(
            "broker_transport_options.visibility_timeout",
            f"{timeout:g}s must be above the longest wait a task can schedule ({largest:g}s, "
            f"{what}); otherwise the Redis broker redelivers the message and it runs twice",
        )


def _sweep_unacked_every_interval(app: Celery) -> None:
    """Let the Redis broker give a killed worker's messages back within one sweep.

    kombu scans for unacked messages past ``visibility_timeout`` every
    ``unacked_restore_interval`` (10 s) but, by default, acts on only every tenth scan
    (``unacked_restore_throttle``): a job killed mid-run could wait 100 s more than its
    visibility timeout. One ZRANGE per worker every 10 s costs nothing; a user's own
    setting is kept (older kombu ignores the option and always throttles).
    """
    url = str(app.conf.broker_url or "")
    if url.split("://", 1)[0] not in _REDIS_BROKERS:
        return
    options = dict(app.conf.broker_transport_options or {})
    if "unacked_restore_throttle" not in options:
        options["unacked_restore_throttle"] = 1
        app.conf.broker_transport_options = options


def install(
    app: Celery,
    redis_url: str | None = None,
    *,
    policies: str | os.PathLike[str] | None = None,
    prefix: str = "rt",
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    acks_late: bool = True,
    reject_on_worker_lost: bool = True,
    max_result_bytes: int = 512 * 1024,
    redis_options: dict[str, Any] | None = None,
    epoch_guard: bool = True,
    cluster: bool = False,
    hmac_key: str | bytes | None = None,
    _configure: bool = True,
) -> Runtime:
    """Wire resilient-tasks into ``app``: safe settings, the store and the publish hook.

    Refuses pickle (a ``PolicyError`` naming the setting). Sets ``task_acks_late`` and
    ``task_reject_on_worker_lost`` so a killed worker's task comes back, JSON serializers,
    and checks the Redis broker's ``visibility_timeout`` against every task's waits.

    ``policies`` (or ``RESILIENT_TASKS_POLICIES``) is the worker policies file;
    ``cluster=True`` talks to a Redis Cluster; ``hmac_key`` (or
    ``RESILIENT_TASKS_HMAC_KEY``) seals cached fallbacks; ``epoch_guard`` notices a store
    that restarted and lost its data; ``clock`` is for simulations and tests.
    """
    redis_url = redis_url or os.environ.get(REDIS_URL_ENV)
    if redis_url is not None and not redis_url.startswith(
        ("redis://", "rediss://", "unix://", "sentinel://")
    ):
        raise PolicyError(
            "install.redis_url",
            f"must be a redis://, rediss://, unix:// or sentinel:// URL: {redact(redis_url)!r}",
        )
    policies = policies or os.environ.get(POLICIES_ENV) or None
    _check_serializers(app)
    if _configure:
        conf = app.conf
        conf.task_serializer = "json"
        conf.result_serializer = "json"
        conf.accept_content = ["json"]
        conf.task_acks_late = acks_late
        conf.task_reject_on_worker_lost = reject_on_worker_lost
        _sweep_unacked_every_interval(app)
    runtime = Runtime(
        app,
        redis_url=redis_url,
        prefix=prefix,
        store=store,
        clock=clock,
        max_result_bytes=max_result_bytes,
        redis_options=redis_options,
        epoch_guard=epoch_guard,
        cluster=cluster,
        hmac_key=_secret(hmac_key or os.environ.get(HMAC_ENV)),
    )
    if policies is not None:
        try:
            runtime.load_policies(policies)
        except policyfile.PolicyFileError as exc:
            if _running_celery_cli():
                raise SystemExit(f"resilient-tasks: the worker will not start.\n{exc}") from None
            raise
    _RUNTIMES[app] = runtime
    signals.before_task_publish.connect(stamp_deadline, weak=False, dispatch_uid="resilient_tasks.deadline")
    if _configure and not getattr(app, "_rt_metrics_option", False):
        from .prometheus import add_worker_option

        add_worker_option(app)
        app._rt_metrics_option = True
    signals.worker_ready.connect(_warm_on_worker_ready, weak=False, dispatch_uid="resilient_tasks.warm")
    signals.worker_process_init.connect(_warm_on_child_start, weak=False, dispatch_uid="resilient_tasks.warm")
    if runtime.policy_file is not None:
        signals.worker_ready.connect(lambda sender=None, **_: runtime.apply_file_switches(), weak=False)
    if _configure and app.finalized:
        check_visibility_timeout(app)  # tasks bound later are checked in ResilientTask.bind
    return runtime


def _warm_on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The worker's main process (solo, threads and gevent pools; prefork's parent)."""
    app = getattr(sender, "app", None)
    runtime = _RUNTIMES.get(app) if app is not None else None
    if runtime is not None:
        runtime.warm_store()


def _warm_on_child_start(**_: Any) -> None:
    """Each prefork child: its own connections."""
    from celery import current_app

    runtime = _RUNTIMES.get(current_app._get_current_object())
    if runtime is not None:
        runtime.warm_store()


def parse_expires(value: Any) -> float | None:
    """Celery's ``expires`` header (ISO text or datetime) as an epoch timestamp."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None
