"""The product: a SOURCE string -> a finished output folder (weights, config, report, card), and many of them.

Modules: :mod:`.clean` (``clean_source``: resolve, load, clean, measure, write, push), :mod:`.batch`
(jobs files, worker pool, resume), :mod:`.scan` (``run_scan``: detection only).
"""

from . import batch as batch
from .clean import Reporter as Reporter
from .clean import evaluate_source as evaluate_source
from .clean import inspect_source as inspect_source
from .clean import push_output as push_output
from .clean import run_clean as run_clean
from .scan import ScanReport as ScanReport
from .scan import run_scan as run_scan

__all__ = ["run_clean", "inspect_source", "evaluate_source", "push_output", "batch", "Reporter", "run_scan", "ScanReport"]
