"""A worker app for kill tests: ``celery -A tests.chaos.chaos_app worker``.

The "downstream" is a ledger in its own Redis DB, changed by one script so a worker
killed mid-call cannot leave it half-written. Like a payment API with idempotency keys,
it applies a job once, and it rejects writes whose fencing token is older than one it
has seen (a stale owner waking up).
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery, signals

import resilient_tasks as rt

BROKER = os.environ["RT_BROKER_URL"]
STORE = os.environ["RESILIENT_TASKS_REDIS_URL"]
LEDGER = os.environ["RT_LEDGER_URL"]
LEASE = float(os.environ.get("RT_LEASE", "2"))
WORK_S = float(os.environ.get("RT_WORK_S", "0.005"))

app = Celery("chaos", broker=BROKER)
app.conf.update(
    broker_transport_options={"visibility_timeout": float(os.environ.get("RT_VISIBILITY", "5"))},
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
rt.install(app, redis_url=STORE)

APPLY = """
local job, token = ARGV[1], tonumber(ARGV[2])
redis.call('HINCRBY', 'calls', job, 1)
local last = tonumber(redis.call('HGET', 'tokens', job) or '0')
if token < last then
  redis.call('HINCRBY', 'stale', job, 1)
  return 'stale'
end
redis.call('HSET', 'tokens', job, token)
if redis.call('HEXISTS', 'applied', job) == 1 then
  return 'already'
end
redis.call('HSET', 'applied', job, token)
return 'applied'
"""

_ledger = redis.Redis.from_url(LEDGER)
if os.environ.get("RT_STORE_SOCKET_TIMEOUT"):
    rt.install(
        app, redis_url=STORE, redis_options={"socket_timeout": float(os.environ["RT_STORE_SOCKET_TIMEOUT"])}
    )
_apply = _ledger.register_script(APPLY)
# Keep the largest value seen (worker threads and processes report concurrently).
_record_max = _ledger.register_script(
    "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then "
    "redis.call('SET', KEYS[1], ARGV[1]) end"
)


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="chaos.apply_once",
    policy=rt.TaskPolicy(idempotency=rt.IdempotencyPolicy(key=("job",), lease=LEASE, ttl=3600)),
)
def apply_once(self: rt.ResilientTask, job: str, pause: float = 0.0) -> str:
    started = time.monotonic()
    _ledger.hset("started", job, self.idempotency.token)
    time.sleep(WORK_S + pause)
    outcome = _apply(args=[job, self.idempotency.token])
    _ledger.hset("body_s", f"{job}:{self.idempotency.token}", round(time.monotonic() - started, 3))
    return outcome.decode() if isinstance(outcome, bytes) else str(outcome)


_started: dict[str, float] = {}


@signals.task_prerun.connect
def _clock_in(task_id: str | None = None, **_: object) -> None:
    if task_id:
        _started[task_id] = time.monotonic()


@signals.task_postrun.connect
def _clock_out(task_id: str | None = None, **_: object) -> None:
    """Each execution's whole time in the worker, store round trips included."""
    began = _started.pop(task_id or "", None)
    if began is not None:
        _record_max(keys=["exec_max_s"], args=[round(time.monotonic() - began, 3)])


def _time_store_calls() -> None:
    """Test instrumentation: the longest single store call, in the ledger."""
    from resilient_tasks.store.redis import RedisStore

    original = RedisStore.batch

    def timed(self: RedisStore, ops: object) -> object:
        began = time.monotonic()
        try:
            return original(self, ops)  # type: ignore[arg-type]
        finally:
            _record_max(keys=["store_call_max_s"], args=[round(time.monotonic() - began, 3)])

    RedisStore.batch = timed  # type: ignore[method-assign, assignment]


if os.environ.get("RT_TIME_STORE"):
    _time_store_calls()
