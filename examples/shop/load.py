"""Send orders to the shop at a steady rate: ``python -m examples.shop.load --orders 600``.

Each order publishes one ``shop.charge`` (about one in ten twice, as a producer retrying
its publish would, so deduplication shows up) and one ``shop.sync_inventory`` for its SKU.
It only publishes: Flower, Grafana and ``celery -A workers.app resilience status`` show
what happened. Run it where the workers' environment is set, e.g.
``docker compose exec worker-1 python -m examples.shop.load``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid

from celery import Celery

from examples.shop.app import PAYMENTS_QUEUE, charge, sync_inventory
from workers.app import BROKER_URL

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shop.load", description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=600, help="orders to send (default 600)")
    parser.add_argument("--rate", type=float, default=20.0, help="orders per second (default 20)")
    parser.add_argument("--skus", type=int, default=20, help="distinct SKUs (default 20)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.orders < 1 or args.rate <= 0 or args.skus < 1:
        parser.error("--orders, --rate and --skus must be positive")
    rng = random.Random(args.seed)
    run = uuid.uuid4().hex[:6]  # order ids are new on every run
    # A sender without a result backend: the worker app's Redis backend would subscribe
    # to a channel per message published through it.
    sender = Celery("shop-load", broker=BROKER_URL, set_as_current=False)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    started = time.monotonic()
    sent = 0
    try:
        with sender.producer_or_acquire() as producer:
            for n in range(args.orders):
                order = {
                    "order_id": f"{run}-{n:06d}",
                    "customer_id": f"c{rng.randrange(100):03d}",
                    "amount": rng.randrange(100, 20_000),
                }
                for _ in range(2 if rng.random() < 0.1 else 1):
                    sender.send_task(charge.name, kwargs=order, queue=PAYMENTS_QUEUE, producer=producer)
                    sent += 1
                sku = f"sku-{rng.randrange(args.skus):03d}"
                sender.send_task(sync_inventory.name, kwargs={"sku": sku}, producer=producer)
                sent += 1
                if (n + 1) % 100 == 0:
                    print(f"{n + 1} orders sent", flush=True)
                time.sleep(max(0.0, started + (n + 1) / args.rate - time.monotonic()))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        sender.close()
    elapsed = time.monotonic() - started
    print(f"published {sent} messages for {args.orders} orders in {elapsed:.1f}s (run {run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
