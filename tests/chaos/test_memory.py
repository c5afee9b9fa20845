"""Unique idempotency keys against a small ``maxmemory`` with ``noeviction``.

Claims are sent straight to the store in pipelines (a million Celery tasks would take
an hour here). A claim the full Redis refuses is a task re-queued, never run: so a side
effect happens only for a claim that holds a record. Default 100,000 keys into 8 MB;
``RT_CHAOS_SCALE=10`` gives the issue's 1,000,000 keys into 64 MB.
"""

from __future__ import annotations

import os

import pytest

from resilient_tasks.errors import StoreUnavailable
from resilient_tasks.keys import digest
from resilient_tasks.store import RedisStore
from resilient_tasks.store.protocol import Claim, Op
from resilient_tasks.testing import RedisServer

pytestmark = pytest.mark.chaos

SCALE = float(os.environ.get("RT_CHAOS_SCALE", "1"))


def test_a_full_store_refuses_claims_and_every_key_keeps_a_ttl() -> None:
    keys = int(100_000 * SCALE)
    maxmemory = (64 if SCALE >= 10 else 8) * 1024 * 1024
    with RedisServer(args=["--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction"]) as server:
        store = RedisStore(server.url(0))
        effects = refused = 0
        batch = 1000
        for start in range(0, keys, batch):
            ops: list[Op] = [
                Claim(digest("bench.task", f"order-{n}"), f"owner-{n}", 60_000, 3_600_000, "fp", f"t{n}")
                for n in range(start, min(keys, start + batch))
            ]
            try:
                answers = store.batch(ops)
            except StoreUnavailable:
                # An OOM fails the call: the caller re-queues every task of the batch, so
                # none of them runs (claims that did land just wait out their lease).
                refused += len(ops)
                continue
            effects += sum(1 for a in answers if a.verdict == "claimed")
        client = server.client()
        info = client.info("memory")
        records = client.dbsize()
        without_ttl = sum(1 for key in client.scan_iter("*", count=5000) if client.pttl(key) < 0)
        print(
            f"\nmemory: keys={keys} maxmemory={maxmemory} used={info['used_memory']} "
            f"records={records} claims_refused={refused} side_effects={effects} without_ttl={without_ttl} "
            f"records_without_effect={records - effects}"
        )
        assert info["used_memory"] <= maxmemory * 1.02  # Redis's own accounting margin
        assert without_ttl == 0
        assert effects <= records, "a side effect only with a record behind it"
        assert refused > 0, "the store did fill up: the test exercised the refusal"
