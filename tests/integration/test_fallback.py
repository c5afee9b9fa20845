"""Fallbacks with a real worker: last known good, then function, then default, then error."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from celery import Celery

import resilient_tasks as rt
from resilient_tasks.testing import RedisServer, in_process_worker


class Prices:
    """A pricing service the tests break; it counts calls per SKU."""

    def __init__(self) -> None:
        self.up = True
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def get(self, sku: str) -> dict[str, object] | rt.NotFound:
        with self.lock:
            self.calls[sku] = self.calls.get(sku, 0) + 1
        if not self.up:
            raise ConnectionError("pricing is down")
        if sku.startswith("missing"):
            return rt.NotFound({"sku": sku, "price": None})
        return {"sku": sku, "price": len(sku)}


def make_task(app: Celery, prices: Prices, **fallback: object) -> object:
    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        name=f"price-{id(prices)}",
        policy=rt.TaskPolicy(
            downstream="pricing",
            idempotent=True,
            breaker=rt.BreakerPolicy(min_calls=1000, when_open="fallback"),
            retry=rt.RetryPolicy(max_retries=1, base=0.01, cap=0.01, budget=None),
            fallback=rt.FallbackPolicy(key=("sku",), ttl=120, decay=0.8, floor=30, **fallback),
        ),
    )
    def price(self: rt.ResilientTask, sku: str) -> object:
        return prices.get(sku)

    return price


def test_cached_value_is_served_degraded_when_retries_are_exhausted(app: Celery) -> None:
    prices = Prices()
    price = make_task(app, prices)
    with in_process_worker(app, concurrency=1):
        fresh = price.delay("abc").get(timeout=20)  # type: ignore[attr-defined]
        prices.up = False
        served = price.delay("abc").get(timeout=20)  # type: ignore[attr-defined]
    assert fresh == {"sku": "abc", "price": 3}
    value, info = rt.unwrap(served)
    assert value == fresh
    assert info is not None and info.source == "cache"
    assert info.age_s is not None and 0 <= info.age_s < 20
    assert prices.calls["abc"] == 3, "one fresh call, then the failing call and its one retry"


def test_function_then_default_then_error(app: Celery) -> None:
    prices = Prices()
    prices.up = False
    by_function = make_task(app, prices, function=lambda sku: {"sku": sku, "price": "estimate"})
    with in_process_worker(app, concurrency=1):
        value, info = rt.unwrap(by_function.delay("never-warmed").get(timeout=20))  # type: ignore[attr-defined]
    assert value == {"sku": "never-warmed", "price": "estimate"}
    assert info is not None and info.source == "function" and info.age_s is None

    app2 = app
    by_default_prices = Prices()
    by_default_prices.up = False
    no_fallback_prices = Prices()
    no_fallback_prices.up = False
    by_default = make_task(app2, by_default_prices, default={"price": 0})
    nothing = make_task(app2, no_fallback_prices)
    with in_process_worker(app2, concurrency=1):
        value, info = rt.unwrap(by_default.delay("x").get(timeout=20))  # type: ignore[attr-defined]
        assert value == {"price": 0} and info is not None and info.source == "default"
        with pytest.raises(ConnectionError, match="pricing is down"):
            nothing.delay("x").get(timeout=20)  # type: ignore[attr-defined]


def test_not_found_is_cached_so_repeats_skip_the_downstream(app: Celery) -> None:
    prices = Prices()
    price = make_task(app, prices, negative_ttl=30)
    with in_process_worker(app, concurrency=1):
        answers = [price.delay("missing-1").get(timeout=20) for _ in range(5)]  # type: ignore[attr-defined]
    assert answers == [{"sku": "missing-1", "price": None}] * 5
    assert prices.calls["missing-1"] == 1


def test_errors_are_never_cached_and_oversize_results_are_not_cached(
    app: Celery, store_client: object
) -> None:
    prices = Prices()
    prices.up = False
    price = make_task(app, prices, default=None)

    @app.task(
        base=rt.ResilientTask,
        bind=True,
        shared=False,
        policy=rt.TaskPolicy(
            fallback=rt.FallbackPolicy(key=("n",), max_size=1000),
        ),
    )
    def big(self: rt.ResilientTask, n: int) -> str:
        return "x" * n

    with in_process_worker(app, concurrency=1):
        _, info = rt.unwrap(price.delay("e").get(timeout=20))  # type: ignore[attr-defined]
        assert info is not None and info.source == "default"
        assert big.delay(5000).get(timeout=20) == "x" * 5000
        assert big.delay(10).get(timeout=20) == "x" * 10
    cached = [k for k in store_client.scan_iter("rt:fb:*")]  # type: ignore[attr-defined]
    assert len(cached) == 1, "only the small result was cached; no error, no oversize value"
    assert store_client.hget(cached[0], "value") == b'"xxxxxxxxxx"'  # type: ignore[attr-defined]
    assert store_client.pttl(cached[0]) > 0  # type: ignore[attr-defined]


def test_sealed_cache_refuses_a_forged_value(
    app_factory: Callable[..., Celery], rt_redis_flushed: RedisServer
) -> None:
    app = app_factory()
    rt.install(app, redis_url=rt_redis_flushed.url(1), hmac_key="shared-secret")
    prices = Prices()
    price = make_task(app, prices, default={"price": "unknown"})
    store = rt_redis_flushed.client(1)
    with in_process_worker(app, concurrency=1):
        assert price.delay("abc").get(timeout=20) == {"sku": "abc", "price": 3}  # type: ignore[attr-defined]
        (key,) = list(store.scan_iter("rt:fb:*"))
        assert store.hget(key, "value").startswith(b"v1.")
        prices.up = False
        value, info = rt.unwrap(price.delay("abc").get(timeout=20))  # type: ignore[attr-defined]
        assert info is not None and info.source == "cache" and value["price"] == 3
        store.hset(key, "value", '{"sku": "abc", "price": 0}')  # another writer forges it
        value, info = rt.unwrap(price.delay("abc").get(timeout=20))  # type: ignore[attr-defined]
    assert info is not None and info.source == "default", "the forged value was not served"
    assert rt.runtime_for(app).counters[("fallback_tampered", "pricing")] == 1


def test_a_result_failing_validation_is_not_cached(app: Celery, store_client: object) -> None:
    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        fallback=rt.FallbackPolicy(key=("n",), validate=lambda r: r.get("price", -1) >= 0),
    ))
    def quote(self: rt.ResilientTask, n: int) -> dict[str, int]:
        return {"n": n, "price": n - 5}

    with in_process_worker(app, concurrency=1):
        assert quote.delay(1).get(timeout=20) == {"n": 1, "price": -4}
        assert quote.delay(9).get(timeout=20) == {"n": 9, "price": 4}
    cached = list(store_client.scan_iter("rt:fb:*"))  # type: ignore[attr-defined]
    assert len(cached) == 1, "only the valid result was cached"


def test_with_the_breaker_open_a_cached_fallback_costs_one_round_trip(app: Celery) -> None:
    prices = Prices()
    price = make_task(app, prices)
    runtime = rt.runtime_for(app)
    trips: list[int] = []
    original = runtime.store.batch

    def counted(ops: object) -> object:
        trips.append(len(ops))  # type: ignore[arg-type]
        return original(ops)  # type: ignore[arg-type]

    with in_process_worker(app, concurrency=1):
        assert price.delay("abc").get(timeout=20) == {"sku": "abc", "price": 3}  # type: ignore[attr-defined]
        rt.set_switch(app, "pricing", "forced_open")
        runtime.store.batch = counted  # type: ignore[method-assign]
        try:
            answers = [price.delay("abc").get(timeout=20) for _ in range(4)]  # type: ignore[attr-defined]
        finally:
            runtime.store.batch = original  # type: ignore[method-assign]
    for answer in answers:
        value, info = rt.unwrap(answer)
        assert info is not None and info.source == "cache" and value == {"sku": "abc", "price": 3}
    assert prices.calls["abc"] == 1, "the open breaker kept every call off the downstream"
    # The first refused call learns the breaker is open (admit, then serve: 2 trips); the
    # next ones fetch the fallback in their single begin trip.
    assert len(trips) == 2 + 3, trips


def test_a_cached_failure_keeps_serving_the_last_good_value(app: Celery) -> None:
    prices = Prices()
    price = make_task(app, prices, cache_failures=True, negative_ttl=30)
    with in_process_worker(app, concurrency=1):
        assert price.delay("abc").get(timeout=20) == {"sku": "abc", "price": 3}  # type: ignore[attr-defined]
        prices.up = False
        first = rt.unwrap(price.delay("abc").get(timeout=20))  # type: ignore[attr-defined]
        calls_after_first = prices.calls["abc"]
        second = rt.unwrap(price.delay("abc").get(timeout=20))  # type: ignore[attr-defined]
    for value, info in (first, second):
        assert info is not None and info.source == "cache" and value == {"sku": "abc", "price": 3}
    assert prices.calls["abc"] == calls_after_first, "the remembered failure skipped the downstream"


def test_all_guards_with_the_breaker_open_serve_the_fallback_in_one_round_trip(app: Celery) -> None:
    """Idempotency too: while the downstream refuses, ``begin`` only looks at the record,
    so a refused call has no claim to give back; a call the breaker admits after all
    claims right before its body."""
    prices = Prices()

    @app.task(base=rt.ResilientTask, bind=True, shared=False, policy=rt.TaskPolicy(
        downstream="pricing",
        idempotency=rt.IdempotencyPolicy(key=("request",)),
        # a write per call (flush_interval=0): the trips below are exact, not batched
        breaker=rt.BreakerPolicy(min_calls=1000, when_open="fallback", flush_interval=0),
        fallback=rt.FallbackPolicy(key=("sku",), ttl=120, floor=30),
    ))
    def price(self: rt.ResilientTask, sku: str, request: str) -> object:
        return {**prices.get(sku), "token": self.idempotency.token}

    runtime = rt.runtime_for(app)
    trips: list[list[str]] = []
    original = runtime.store.batch

    def counted(ops: object) -> object:
        trips.append([op.name for op in ops])  # type: ignore[attr-defined]
        return original(ops)  # type: ignore[arg-type]

    with in_process_worker(app, concurrency=1):
        assert price.delay("abc", "r1").get(timeout=20) == {"sku": "abc", "price": 3, "token": 1}
        rt.set_switch(app, "pricing", "forced_open")
        runtime.store.batch = counted  # type: ignore[method-assign]
        try:
            price.delay("abc", "r2").get(timeout=20)  # learns that the downstream refuses
            first = len(trips)
            refused = [rt.unwrap(price.delay("abc", f"r{n}").get(timeout=20)) for n in range(3, 6)]
            refused_trips = trips[first:]
            del trips[:]
            replayed = price.delay("abc", "r1").get(timeout=20)
            replay_trips = list(trips)
            rt.set_switch(app, "pricing", "normal")  # admitted while still believed refusing
            del trips[:]
            fresh = price.delay("abc", "r6").get(timeout=20)
            admitted_trips = list(trips)
        finally:
            runtime.store.batch = original  # type: ignore[method-assign]
        again = price.delay("abc", "r6").get(timeout=20)
    for value, info in refused:
        assert info is not None and info.source == "cache" and value["price"] == 3
    assert refused_trips == [["claim", "admit", "cache_get"]] * 3, "one round trip per refused call"
    assert replayed == {"sku": "abc", "price": 3, "token": 1}, "a finished job still replays its result"
    assert replay_trips == [["claim", "admit", "cache_get"]]
    assert prices.calls["abc"] == 2, "only r1 and r6 reached the downstream"
    assert fresh == again and fresh["price"] == 3 and fresh["token"] >= 1
    assert [sorted(t) for t in admitted_trips] == [
        ["admit", "cache_get", "claim"], ["claim"], ["complete", "record"]
    ], "look, claim before the body, then the usual end (the cached value is fresh: not rewritten)"


def test_fallback_keys_hash_their_own_spec_and_share_an_equal_idempotency_key(
    app: Celery, store_client: object
) -> None:
    from resilient_tasks.keys import canonical, digest

    def make(name: str, fallback_key: tuple[str, ...]) -> object:
        @app.task(base=rt.ResilientTask, shared=False, name=name, policy=rt.TaskPolicy(
            idempotency=rt.IdempotencyPolicy(key=("sku",)),
            fallback=rt.FallbackPolicy(key=fallback_key),
        ))
        def quote(sku: str, region: str) -> dict[str, str]:
            return {"sku": sku, "region": region}

        return quote

    same, coarser = make("quote.same", ("sku",)), make("quote.coarser", ("region",))
    assert same.apply(args=("abc", "eu")).get() == {"sku": "abc", "region": "eu"}  # type: ignore[attr-defined]
    assert coarser.apply(args=("abc", "eu")).get() == {"sku": "abc", "region": "eu"}  # type: ignore[attr-defined]
    idem = {k.decode() for k in store_client.scan_iter("rt:idem:*")}  # type: ignore[attr-defined]
    fb = {k.decode() for k in store_client.scan_iter("rt:fb:*")}  # type: ignore[attr-defined]
    by_sku = {f"rt:idem:{{{digest(n, canonical(['abc']))}}}" for n in ("quote.same", "quote.coarser")}
    assert idem == by_sku
    assert fb == {
        f"rt:fb:{{{digest('quote.same', canonical(['abc']))}}}",
        f"rt:fb:{{{digest('quote.coarser', canonical(['eu']))}}}",
    }
