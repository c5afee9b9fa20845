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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from . import config
from .errors import PolicyError, StoreUnavailable
from .guards.base import DEADLINE_HEADER, current_deadline
from .guards.tally import Tally
from .heartbeat import Heartbeat
from .policy import BreakerPolicy
from .process import current_pid
from .settings import (
    DEFAULT_LEASE,
    REDIS_BROKERS,
    check_serializers,
    check_visibility_timeout,
    task_lease,
)
from .store.memory import MemoryStore
from .store.protocol import Admission, Store, Switch
from .store.redis import RedisStore
from .store.urls import redact
from .telemetry import MetricsSink, default_sinks

if TYPE_CHECKING:
    from celery import Celery

    from .policy import TaskPolicy

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
        self.policy_file: config.PolicyFile | None = None
        self.reload_interval = float(os.environ.get("RESILIENT_TASKS_RELOAD_INTERVAL", "1.0"))
        self._resolved: dict[str, tuple[TaskPolicy, config.Merged[TaskPolicy]]] = {}
        self._downstreams: dict[tuple[str, str], BreakerPolicy] = {}
        self._next_check = 0.0
        self._refused_mtime: float | None = None
        #: This process's stand-in for breakers and retry budgets while the store is
        #: unreachable (fail-open): the same operations, in memory.
        self.local = MemoryStore(clock)
        self._tallies: dict[str, Tally] = {}
        self._tallies_pid = -1

    def tally(self, downstream: str) -> Tally:
        """This process's view of ``downstream``'s breaker and its unsent successes (a
        forked child starts with none of its parent's)."""
        pid = current_pid()
        if pid != self._tallies_pid:
            self._tallies, self._tallies_pid = {}, pid
        found = self._tallies.get(downstream)
        if found is None:
            found = self._tallies.setdefault(downstream, Tally(self.clock))
        return found

    def longest_lease(self) -> float:
        """The longest idempotency lease of this app's tasks (how long an old run may live)."""

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

    #: Events an operator alerts on: besides ``counters``, each is told to every sink
    #: (OTel counter ``resilience.events``, Prometheus ``resilience_events_total``, with
    #: ``event`` and ``downstream`` labels).
    EXPORTED_EVENTS = frozenset(
        {"store_amnesia", "end_lost", "policy_reload_refused", "store_misconfigured", "fallback_tampered"}
    )

    def count(self, event: str, downstream: str = "") -> None:
        """Count an outcome in this process; an event of ``EXPORTED_EVENTS`` is also told
        to every sink (never raises)."""
        self.counters[(event, downstream)] += 1
        if event in self.EXPORTED_EVENTS:
            for sink in self.sinks:
                try:
                    sink.event(event, downstream)
                except Exception as exc:  # a metric is worth less than the task counting it
                    log.warning("could not export the %s event to %s: %s", event, type(sink).__name__, exc)

    def breaker_policy(self, name: str, task: Any, task_policy: TaskPolicy) -> BreakerPolicy:
        """The breaker policy for ``name`` in ``task`` (whose effective policy is
        ``task_policy``).

        The task's own downstream: its merged policy (file layers already in). Another
        name (``self.downstream(name)``): ``[downstreams.name]`` layered over the task's
        breaker policy, merged and checked like any other policy (``config``)."""
        if name == task_policy.downstream and task_policy.breaker is not None:
            return task_policy.breaker
        if self.policy_file is None:
            return task_policy.breaker or DEFAULT_BREAKER
        found = self._downstreams.get((name, task.name))
        if found is None:
            try:
                merged = config.merge_downstream(name, task.name, task.policy, self.policy_file).policy
            except PolicyError as exc:  # checked at worker start: only a name seen at run time
                log.error("breaker %r of %s: the policies file does not apply (%s)", name, task.name, exc)
                merged = task_policy.breaker or DEFAULT_BREAKER
            found = self._downstreams[(name, task.name)] = merged
        return found

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
        """Load and check the policies file (raises ``PolicyFileError``); it is checked
        against every registered task when the worker starts (``check_policies``)."""
        self.policies_path = str(path)
        self.policy_file = config.load(self.policies_path)
        self._resolved.clear()
        self._downstreams.clear()
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
                store = self.store
                if isinstance(store, RedisStore) and store.on_misconfigured is None:
                    store.on_misconfigured = WorkerChecks.reporter(self)
                store.warm()
            except (PolicyError, ValueError, StoreUnavailable) as exc:
                log.error("%s", exc)

        threading.Thread(target=warm, name="rt-store-warm-up", daemon=True).start()

    def store_timeout(self) -> float:
        """The store's socket timeout: how long one round trip may block a worker."""
        timeout = getattr(self.store, "socket_timeout", None)
        return float(timeout) if timeout else 5.0

    def policy_for(self, task: Any) -> TaskPolicy:
        """The effective policy of ``task`` (a ``ResilientTask``): file layers around the
        code's policy."""
        if self.policies_path is not None:
            self._maybe_reload()
        resolved = self._resolved.get(task.name)
        if resolved is None or resolved[0] is not task.policy:
            try:
                found = config.merge(task.name, task.policy, self.policy_file)
            except PolicyError as exc:
                # checked at worker start and before any reload is taken: only a task
                # registered after the worker started can get here
                log.error(
                    "task %s: the policies file does not apply, its code policy is used: %s", task.name, exc
                )
                found = config.Merged(task.policy, {}, {})
            resolved = self._resolved[task.name] = (task.policy, found)
        return resolved[1].policy

    def resolved(self, name: str, code: TaskPolicy) -> config.Merged[TaskPolicy]:
        """The effective policy and the layer that set each field (for ``policies``)."""
        return config.merge(name, code, self.policy_file)

    def registered(self) -> dict[str, TaskPolicy]:
        """The app's resilient tasks and their code policies."""
        tasks = self.app._tasks  # the registry as it is: no finalize from a worker's thread
        return {name: task.policy for name, task in list(tasks.items()) if getattr(task, "resilient", False)}

    def check_policies(self) -> None:
        """Every registered task merged with the policies file, checked as code is:
        raises ``PolicyFileError`` naming file, line, table, key and rule."""
        if self.policy_file is None:
            return
        config.check(self.policy_file, self.registered(), extra=visibility_rule(self.app)).raise_errors()

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
        # never raises: a file of any shape or encoding is refused whole, and checked
        # against every registered task first, so no job fails because of a reload
        result = config.reload(
            self.policy_file, self.policies_path, tasks=self.registered(), extra=visibility_rule(self.app)
        )
        if result.error is not None:
            self._refused_mtime = result.mtime if result.mtime is not None else mtime
            self.count("policy_reload_refused")
            log.error(
                "policies file change NOT applied (the last good file stays in force):\n%s", result.error
            )
            return
        previous = self.policy_file
        self.policy_file = result.file
        if not result.changed:
            return
        self._resolved.clear()
        self._downstreams.clear()
        self.count("policy_reload")
        log.warning("policies file %s reloaded: breaker settings and switches applied", self.policies_path)
        if result.pending:
            self.count("policy_reload_partial")
            log.warning("not applied live, restart the workers to apply: %s", "; ".join(result.pending))
        changed = {k: v for k, v in result.file.switches.items() if previous.switches.get(k) != v}
        self.apply_file_switches(changed)

    def apply_file_switches(self, switches: Mapping[str, str] | None = None) -> None:
        """Write the file's switches to Redis (only values the file changed take effect)."""
        if self.policy_file is None:
            return
        for name, mode in (self.policy_file.switches if switches is None else switches).items():
            try:
                self.store.batch([Switch(name, mode, "file", self.now_ms())])  # type: ignore[arg-type]
                self.tally(name).forget()
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


def visibility_rule(app: Celery) -> config.ExtraCheck:
    """The visibility-timeout rule applied to a merged policy (on a stand-in of the task
    that carries it), so a policy from the file meets the same check as one in code."""

    def rule(name: str, policy: TaskPolicy) -> str | None:
        task = app._tasks.get(name)
        if task is None:
            return None
        stand_in = object.__new__(type(task))
        stand_in.__dict__.update(vars(task))
        stand_in.policy = policy
        check_visibility_timeout(app, [stand_in])  # raises PolicyError naming the field
        return None

    return rule


def _sweep_unacked_every_interval(app: Celery) -> None:
    """Let the Redis broker give a killed worker's messages back within one sweep.

    kombu scans for unacked messages past ``visibility_timeout`` every
    ``unacked_restore_interval`` (10 s) but, by default, acts on only every tenth scan
    (``unacked_restore_throttle``): a job killed mid-run could wait 100 s more than its
    visibility timeout. One ZRANGE per worker every 10 s costs nothing; a user's own
    setting is kept (older kombu ignores the option and always throttles).
    """
    url = str(app.conf.broker_url or "")
    if url.split("://", 1)[0] not in REDIS_BROKERS:
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
    max_result_bytes: int = 512 * 1024,
    redis_options: dict[str, Any] | None = None,
    epoch_guard: bool = True,
    cluster: bool = False,
    hmac_key: str | bytes | None = None,
    _configure: bool = True,
) -> Runtime:
    """Wire resilient-tasks into ``app``: safe settings, the store and the publish hook.

    Refuses pickle (a ``PolicyError`` naming the setting; checked again when a worker
    starts), adds ``json`` to ``accept_content`` (other tasks' settings are left alone:
    ``ResilientTask`` itself sets ``acks_late``, ``reject_on_worker_lost`` and JSON), and
    checks the Redis broker's ``visibility_timeout`` against every task's waits.

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
    check_serializers(app)
    if _configure:
        conf = app.conf
        # ResilientTask carries acks_late, reject_on_worker_lost and the JSON serializer
        # itself (Celery reads them per task): other tasks' settings are left alone.
        accepted = list(conf.accept_content or ())
        if "json" not in accepted and "application/json" not in accepted:
            conf.accept_content = [*accepted, "json"]
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
        except config.PolicyFileError as exc:
            if _running_celery_cli():
                raise SystemExit(f"resilient-tasks: the worker will not start.\n{exc}") from None
            raise
    _RUNTIMES[app] = runtime
    signals.task_received.connect(refuse_foreign_serializer, weak=False, dispatch_uid="resilient_tasks.json")
    signals.before_task_publish.connect(stamp_deadline, weak=False, dispatch_uid="resilient_tasks.deadline")
    if WorkerChecks not in app.steps["worker"]:
        app.steps["worker"].add(WorkerChecks)
    if _configure and not getattr(app, "_rt_metrics_option", False):
        from .prometheus import add_worker_option

        add_worker_option(app, lambda target: runtime_for(target).sinks)
        app._rt_metrics_option = True
    signals.worker_ready.connect(_warm_on_worker_ready, weak=False, dispatch_uid="resilient_tasks.warm")
    signals.worker_process_init.connect(_warm_on_child_start, weak=False, dispatch_uid="resilient_tasks.warm")
    if runtime.policy_file is not None:
        signals.worker_ready.connect(lambda sender=None, **_: runtime.apply_file_switches(), weak=False)
    if _configure and app.finalized:
        check_visibility_timeout(app)  # tasks bound later are checked in ResilientTask.bind
    return runtime


def refuse_foreign_serializer(sender: Any = None, request: Any = None, **_: Any) -> None:
    """``task_received``: a ResilientTask message in another serializer than JSON (an
    app may accept msgpack or yaml for its other tasks) is revoked, never run. Runs in
    the worker's main process for every message: nothing is looked up before it is
    needed."""
    if request is None or request.content_type in ("application/json", None):
        return
    if not getattr(request.task, "resilient", False):
        return
    from celery.worker import state

    log.error(
        "task %s[%s] arrived as %s: a ResilientTask runs JSON messages only; revoked, not run",
        request.name,
        request.id,
        request.content_type,
    )
    state.revoked.add(request.id)


class WorkerChecks(bootsteps.Step):  # type: ignore[misc]
    """Refuse to start a worker whose settings or policies file would fail its tasks:
    checked after every ``conf.update`` (pickle switched on after ``install``), against
    every task registered by then, the same checks a policy in code gets; and a worker
    whose store refuses it (a wrong password, an ACL right missing: ``check_store``).
    Each refusal is one ERROR line and exit status 1."""

    label = "resilient-tasks checks"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        runtime = _RUNTIMES.get(worker.app)
        if runtime is None:
            return
        try:
            check_serializers(worker.app)
            runtime.check_policies()
        except PolicyError as exc:
            raise self.refuse(exc) from None
        self.check_store(runtime)

    class Refused(SystemExit):
        """Exit status 1, and the reason as its text (the ERROR line already told it:
        Python prints nothing more for an exit with a number)."""

        def __init__(self, message: str) -> None:
            super().__init__(1)
            self.message = message

        def __str__(self) -> str:
            return self.message

    @classmethod
    def refuse(cls, reason: BaseException) -> WorkerChecks.Refused:
        """One ERROR line saying why the worker will not start, and the exit to raise."""
        message = f"resilient-tasks: the worker will not start.\n{reason}"
        log.error("%s", message)
        return cls.Refused(message)

    #: At run time, the same refusal is logged at most once per this many seconds (each
    #: one is counted).
    MISCONFIGURED_LOG_EVERY = 30.0

    @classmethod
    def check_store(cls, runtime: Runtime) -> None:
        """Ask the store for every right a worker needs (``RedisStore.check``): a store
        that refuses us (a wrong password, an ACL right missing) or a URL that cannot
        work stops the worker with one ERROR; a store that cannot be reached now is only
        logged (the worker starts, and its tasks defer until the store answers)."""
        from .errors import StoreMisconfigured

        if not runtime.redis_url and runtime._store is None:
            return  # no store configured: a task that needs one says so
        store: Store | None = None
        try:
            store = runtime.store
            check = getattr(store, "check", None)
            if check is not None:
                check()
        except (StoreMisconfigured, ValueError) as exc:
            raise cls.refuse(exc) from None
        except StoreUnavailable as exc:
            log.warning(
                "resilient-tasks: the store cannot be reached as the worker starts; its tasks "
                "defer until it answers: %s",
                exc,
            )
        if isinstance(store, RedisStore):  # (after the check: its refusal is told once)
            store.on_misconfigured = cls.reporter(runtime)

    @classmethod
    def reporter(cls, runtime: Runtime) -> Callable[[StoreUnavailable], None]:
        """What a running worker does with a refusal for who it is: count it
        (``store_misconfigured``, exported) and log an ERROR, at most once per
        ``MISCONFIGURED_LOG_EVERY`` seconds for the same refusal."""
        last: dict[str, float] = {}

        def report(error: StoreUnavailable) -> None:
            runtime.count("store_misconfigured")
            said = str(error)
            now = time.monotonic()
            if now - last.get(said, -cls.MISCONFIGURED_LOG_EVERY) >= cls.MISCONFIGURED_LOG_EVERY:
                last[said] = now
                log.error("resilient-tasks: %s (tasks that need the store defer until it is fixed)", said)

        return report


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
