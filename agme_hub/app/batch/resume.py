"""Resuming a batch: what a killed job left behind, and whether a job's output folder is already complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ...constants import WEIGHTS_NAME
from ...errors import UsageError
from ...hub.checkpoint import sha256_file
from ...options import CleanOptions
from ...report import CleanReport, PushRecord
from .jobs import Job, log_path
from .summary import JobResult

__all__ = ["sweep", "read_report", "resume_state", "skipped", "push_url"]

# Options that do not change the cleaned weights: a complete job whose report differs only here is still done.
_NOT_RESULT = frozenset({"out", "yes", "dry_run", "offline", "push_to", "create_pr", "private"})


def sweep(model_dir: Path) -> None:
    """Remove what a killed job left beside its output folder (the temporary folders of atomic_output_dir)."""
    parent = model_dir.parent
    if not parent.is_dir():
        return
    for old in sorted(parent.glob(f".{model_dir.name}.old-*")):
        if not model_dir.exists():  # killed between the two renames: the old folder is the last complete one
            os.replace(old, model_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f".{model_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_report(model_dir: Path) -> CleanReport | None:
    """The run report in ``model_dir``; None when there is none or it cannot be read (the job then runs again)."""
    try:
        return CleanReport.load(model_dir)
    except UsageError:
        return None


def _options_record(options: CleanOptions) -> dict[str, Any]:
    """The options as run_clean writes them into the report, less those that do not change the weights."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.public_dict().items()
            if k not in _NOT_RESULT}


def resume_state(job: Job, model_dir: Path) -> tuple[str, str]:
    """``("done" | "push" | "run", why)`` for a job whose output folder may already be complete."""
    report = read_report(model_dir)
    if report is None:
        return "run", "no report yet"
    if report.status != "complete":
        return "run", f"the report says {report.status!r}"
    weights = model_dir / WEIGHTS_NAME
    expected = report.provenance.weights_sha256
    if not weights.is_file() or not expected or sha256_file(weights) != expected:
        return "run", "the weights do not match the sha256 in the report"
    recorded = {k: v for k, v in report.options.items() if k not in _NOT_RESULT}
    if report.source != job.source or recorded != _options_record(job.options):
        return "run", "the source or the options changed since the complete run"
    if job.options.push_to and (report.push is None or report.push.repo_id != job.options.push_to):
        return "push", f"complete but not pushed to {job.options.push_to} yet"
    return "done", "complete"


def skipped(job: Job, model_dir: Path, root: Path) -> JobResult:
    """The result of a job found complete: its metrics and push as its report records them."""
    report = read_report(model_dir) or CleanReport()
    return JobResult(job.name, job.source, status="skipped", output_dir=str(model_dir),
                     log=str(log_path(job, root)), before=report.before.to_json(), after=report.after.to_json(),
                     push_url=push_url(report))


def push_url(report: CleanReport) -> str | None:
    """The pull request or commit a run report says the output was pushed to."""
    return report.push.url if isinstance(report.push, PushRecord) else None
