"""Worker app for the breaker race: two downstreams kept in Redis next to the breakers.

A "call" to a downstream is one script that reads the breaker's state and the service's
health in the same atomic step, so "a call arrived while the breaker was OPEN" is exact.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.store import RedisStore

app = Celery("race", broker=os.environ["RT_BROKER_URL"], backend=os.environ["RT_RESULT_BACKEND"])
app.conf.update(
    broker_transport_options={"visibility_timeout": 300},
    worker_prefetch_multiplier=1,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
STORE_URL = os.environ["RESILIENT_TASKS_REDIS_URL"]
rt.install(app, redis_url=STORE_URL)

OPEN_FOR = float(os.environ.get("RT_OPEN_FOR", "2"))
MIN_CALLS = int(os.environ.get("RT_MIN_CALLS", "10"))

CALL = """
local service, brk = ARGV[1], KEYS[1]
local state = redis.call('HGET', brk, 'state') or 'closed'
local t = redis.call('TIME')
redis.call('SET', 'ledger:' .. service .. ':last_call_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HINCRBY', 'ledger:' .. service, 'calls', 1)
redis.call('HINCRBY', 'ledger:' .. service, 'calls_' .. state, 1)
if redis.call('GET', 'ledger:' .. service .. ':down') == '1' then
  redis.call('HINCRBY', 'ledger:' .. service, 'fail_' .. state, 1)
  return 503
end
redis.call('HINCRBY', 'ledger:' .. service, 'ok', 1)
return 200
"""
_ledger = redis.Redis.from_url(STORE_URL)
_call = _ledger.register_script(CALL)
_keys = RedisStore(STORE_URL)



def call_service(name: str) -> str:
    status = int(_call(keys=[_keys.breaker_key(name)], args=[name]))
    if status != 200:
        raise ConnectionError(f"{name} answered {status}")
    return name


def _policy(name: str) -> rt.TaskPolicy:
    return rt.TaskPolicy(
        downstream=name,
        idempotent=True,
        breaker=rt.BreakerPolicy(
            min_calls=MIN_CALLS,
            failure_rate=0.5,
            window=30,
            open_for=OPEN_FOR,
            half_open_probes=1,
            when_open="defer",
            max_deferrals=200,
        ),
        retry=rt.RetryPolicy(max_retries=8, base=0.05, cap=0.5, budget=None),
    )


@app.task(base=rt.ResilientTask, bind=True, name="race.call_a", policy=_policy("A"))
def call_a(self: rt.ResilientTask, n: int) -> str:
    return call_service("A")


@app.task(base=rt.ResilientTask, bind=True, name="race.call_b", policy=_policy("B"))
def call_b(self: rt.ResilientTask, n: int) -> str:
    return call_service("B")


@app.task(
    base=rt.ResilientTask,
    bind=True,
    name="race.read_catalog",
    policy=rt.TaskPolicy(downstream="catalog", fallback=rt.FallbackPolicy(key=("n",), default="stale")),
)
def read_catalog(self: rt.ResilientTask, n: int) -> str:
    call_service("catalog")
    return "fresh"
