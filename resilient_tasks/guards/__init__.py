"""The guards: each one module, one class with explicit phases (``base.Guard``).

The chain for a policy is built in one place, ``resilient_tasks.pipeline.chain_for``;
adding a guard means one new module here and one line there.
"""

from .base import Decision, Execution, Guard, Kind, Outcome, Stage

__all__ = ["Decision", "Execution", "Guard", "Kind", "Outcome", "Stage"]
