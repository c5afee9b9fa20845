"""The shop of the compose walk-through (examples/README.md): payments and inventory.

``examples.shop.app`` registers the tasks on the worker app (``workers.app``);
``python -m examples.shop.load`` sends orders to them.
"""
