"""install(): safe settings, refusals with clear errors, checks at registration."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer, in_process_worker
from tests.conftest import make_app


def test_pickle_in_accept_content_fails_install() -> None:
    app = Celery("p", broker="memory://", set_as_current=False)
    app.conf.accept_content = ["json", "pickle"]
    with pytest.raises(rt.PolicyError) as info:
        rt.install(app, redis_url="redis://127.0.0.1:1/0")
    assert info.value.field == "accept_content"
    assert "pickle is refused" in str(info.value)


def test_pickle_serializer_fails_install() -> None:
    app = Celery("p", broker="memory://", set_as_current=False)
    app.conf.task_serializer = "pickle"
    with pytest.raises(rt.PolicyError, match="task_serializer"):
        rt.install(app)


def test_install_sets_safe_settings_per_task_and_leaves_other_tasks_alone() -> None:
    app = Celery("d", broker="memory://", set_as_current=False)
    app.conf.accept_content = ["msgpack"]
    rt.install(app, redis_url="rediss://user:secret@127.0.0.1:6380/1?ssl_cert_reqs=required")

    @app.task(base=rt.ResilientTask, shared=False)
    def guarded() -> None: ...

    @app.task(shared=False)
    def plain() -> None: ...

    assert list(app.conf.accept_content) == ["msgpack", "json"], "added to, not replaced"
    assert not app.conf.task_acks_late and not app.conf.task_reject_on_worker_lost
    assert guarded.acks_late is True and guarded.reject_on_worker_lost is True
    assert guarded.serializer == "json"
    assert not plain.acks_late and not plain.reject_on_worker_lost


def test_pickle_switched_on_after_install_stops_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C_FORCE_ROOT", "1")  # past Celery's own root check: ours must stop it
    app = Celery("p", broker="memory://", set_as_current=False)
    rt.install(app, redis_url="redis://127.0.0.1:1/1")
    app.conf.update(accept_content=["json", "pickle"])
    with pytest.raises(SystemExit, match="(?s)will not start.*accept_content.*pickle is refused"):
        app.Worker(pool="solo", concurrency=1, loglevel="WARNING", without_heartbeat=True, use_eventloop=False)


def test_a_resilient_task_message_in_another_serializer_is_revoked_not_run(
    rt_redis_flushed: RedisServer,
) -> None:
    app = make_app(rt_redis_flushed, accept_content=["json", "yaml"])
    rt.install(app, redis_url=rt_redis_flushed.url(1))
    runs: list[str] = []

    @app.task(base=rt.ResilientTask, shared=False, name="t.guarded")
    def guarded(x: str) -> str:
        runs.append(x)
        return x

    @app.task(shared=False, name="t.plain")
    def plain(x: str) -> str:
        return x

    with in_process_worker(app, concurrency=1):
        assert plain.apply_async(("y",), serializer="yaml").get(timeout=20) == "y", "other tasks keep yaml"
        sent = guarded.apply_async(("y",), serializer="yaml")
        with pytest.raises(TaskRevokedError):
            sent.get(timeout=20)
        assert guarded.delay("j").get(timeout=20) == "j"
    assert runs == ["j"], "the yaml message never ran"


def test_install_makes_every_unacked_sweep_of_a_redis_broker_count() -> None:
    redis_app = Celery("b", broker="redis://127.0.0.1:1/0", set_as_current=False)
    redis_app.conf.broker_transport_options = {"visibility_timeout": 600}
    rt.install(redis_app, redis_url="redis://127.0.0.1:1/1")
    assert redis_app.conf.broker_transport_options == {"visibility_timeout": 600, "unacked_restore_throttle": 1}

    chosen = Celery("c", broker="redis://127.0.0.1:1/0", set_as_current=False)
    chosen.conf.broker_transport_options = {"unacked_restore_throttle": 5}
    rt.install(chosen, redis_url="redis://127.0.0.1:1/1")
    assert chosen.conf.broker_transport_options == {"unacked_restore_throttle": 5}, "the user's choice stays"

    amqp = Celery("a", broker="amqp://127.0.0.1:1//", set_as_current=False)
    rt.install(amqp, redis_url="redis://127.0.0.1:1/1")
    assert "unacked_restore_throttle" not in (amqp.conf.broker_transport_options or {})


def test_bad_store_url_is_refused() -> None:
    app = Celery("u", broker="memory://", set_as_current=False)
    with pytest.raises(rt.PolicyError, match="install.redis_url"):
        rt.install(app, redis_url="http://127.0.0.1:6379")


def test_retry_policy_on_non_idempotent_task_fails_at_registration() -> None:
    app = Celery("r", broker="memory://", set_as_current=False)
    with pytest.raises(rt.PolicyError, match="TaskPolicy.retry: only idempotent work"):

        @app.task(base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(retry=rt.RetryPolicy()))
        def charge(order_id: int) -> None: ...


def test_key_naming_a_missing_argument_fails_at_registration() -> None:
    with pytest.raises(rt.PolicyError, match="order_id is not an argument"):

        class Charge(rt.ResilientTask):
            name = "k.charge"
            policy = rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("order_id",)))

            def run(self, customer_id: int) -> None: ...


def test_policy_must_be_a_task_policy() -> None:
    app = Celery("t", broker="memory://", set_as_current=False)

    @app.task(base=rt.ResilientTask, policy={"retry": 3}, shared=False)
    def charge() -> None: ...

    with pytest.raises(rt.PolicyError, match="charge.policy: must be a TaskPolicy"):
        app.finalize()  # a worker finalizes its app at start: the error comes then


def test_visibility_timeout_below_a_retry_cap_is_refused() -> None:
    app = Celery("v", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    rt.install(app, redis_url="redis://127.0.0.1:1/1")

    @app.task(
        base=rt.ResilientTask,
        shared=False,
        policy=rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy(cap=600)),
    )
    def slow_retry() -> None: ...

    with pytest.raises(rt.PolicyError) as info:
        app.finalize()
    assert info.value.field == "broker_transport_options.visibility_timeout"
    assert "RetryPolicy.cap" in str(info.value)


def test_idempotency_lease_above_visibility_timeout_is_refused() -> None:
    app = Celery("l", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 100}

    @app.task(
        base=rt.ResilientTask, shared=False, policy=rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(lease=300))
    )
    def long_job() -> None: ...

    with pytest.raises(rt.PolicyError, match="IdempotencyPolicy.lease"):
        app.finalize()


def test_non_redis_broker_skips_the_visibility_check() -> None:
    app = Celery("a", broker="amqp://guest@127.0.0.1//", set_as_current=False)

    @app.task(
        base=rt.ResilientTask,
        shared=False,
        policy=rt.TaskPolicy(idempotent=True, retry=rt.RetryPolicy(cap=7200)),
    )
    def job() -> None: ...

    app.finalize()
    rt.install(app, redis_url="redis://127.0.0.1:1/1")
