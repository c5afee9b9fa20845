"""The worker policies file: the operators' layer over the task authors' policies.

``load`` reads and checks a file (every error at once, only ``PolicyFileError``);
``merge`` layers it over a task's code policy through the policies' own constructors;
``check`` tries every registered task against a file; ``reload`` re-reads it in a
running worker and never raises. Imports nothing of ours but ``policy`` and ``errors``.
"""

from .check import ExtraCheck, Report, check
from .file import SWITCH_MODES, PolicyFile, load, parse
from .merge import CODE, Merged, MergeError, merge, merge_downstream, stated
from .problems import PolicyFileError, Problem
from .reload import Reload, live, reload

__all__ = [
    "CODE",
    "SWITCH_MODES",
    "ExtraCheck",
    "MergeError",
    "Merged",
    "PolicyFile",
    "PolicyFileError",
    "Problem",
    "Reload",
    "Report",
    "check",
    "live",
    "load",
    "merge",
    "merge_downstream",
    "parse",
    "reload",
    "stated",
]
