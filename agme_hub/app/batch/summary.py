"""What a batch did: one :class:`JobResult` per job, the :class:`BatchSummary` and its files, and the
:class:`Tracker` through which the parent process keeps both up to date while jobs run."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..._version import __version__
from .jobs import SUMMARY_CSV, SUMMARY_JSON, Job, log_path, model_dir

__all__ = ["JobResult", "BatchSummary", "Tracker", "SUCCEEDED", "FINAL"]

SUCCEEDED = frozenset({"complete", "skipped", "dry-run"})
FINAL = SUCCEEDED | {"failed", "cancelled", "interrupted"}
_METRICS = ("clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy")
_WRITE_EVERY = 2.0  # seconds between two rewrites of the summary files while jobs finish


@dataclass(frozen=True)
class JobResult:
    """The state of one job: ``pending`` -> ``running`` -> a final status (see ``FINAL``).

    ``skipped`` means already complete (``resume``); ``cancelled`` means never started (an earlier failure, or
    an interrupt); ``interrupted`` means stopped while running, its output folder left as it was before.
    """

    name: str
    source: str
    status: str = "pending"
    output_dir: str = ""
    log: str = ""
    before: dict[str, float | None] | None = None
    after: dict[str, float | None] | None = None
    seconds: float | None = None  # time of this run's work on the job (None when it did none)
    push_url: str | None = None
    error: str | None = None
    exit_code: int | None = None  # the error's exit code, as `agme clean` would have exited
    worker: str | None = None  # host:pid that ran it
    stage: str = ""  # what a running job is doing
    started_at: float | None = None  # time.time() when it started

    @property
    def ok(self) -> bool:
        return self.status in SUCCEEDED

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        del record["stage"]
        return record


@dataclass(frozen=True)
class BatchSummary:
    """What a batch did: one :class:`JobResult` per job, in jobs-file order."""

    jobs: tuple[JobResult, ...]
    out_root: str
    backend: str
    workers: int
    threads_per_worker: int
    wall_seconds: float
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """Every job succeeded (complete, skipped as already complete, or a dry run) and nothing was interrupted."""
        return not self.interrupted and all(job.ok for job in self.jobs)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(job.status for job in self.jobs))

    @property
    def models_per_minute(self) -> float:
        """Jobs completed by this run per minute of wall time (skipped jobs do not count)."""
        done = sum(job.status == "complete" for job in self.jobs)
        return 60.0 * done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"agme_version": __version__, "ok": self.ok, "interrupted": self.interrupted,
                "backend": self.backend, "workers": self.workers, "threads_per_worker": self.threads_per_worker,
                "out_root": self.out_root, "wall_seconds": round(self.wall_seconds, 3),
                "models_per_minute": round(self.models_per_minute, 3), "counts": self.counts,
                "jobs": [job.as_dict() for job in self.jobs]}

    def csv_text(self) -> str:
        columns = ["name", "status", "source", *(f"{m}_{when}" for m in _METRICS for when in ("before", "after")),
                   "seconds", "push_url", "output_dir", "log", "exit_code", "error", "worker"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for job in self.jobs:
            row = job.as_dict()
            for when in ("before", "after"):
                for metric in _METRICS:
                    row[f"{metric}_{when}"] = (row[when] or {}).get(metric)
            writer.writerow(row)
        return buffer.getvalue()

    def write(self) -> tuple[Path, Path]:
        """Write ``summary.json`` and ``summary.csv`` into ``out_root`` (each replaced atomically)."""
        root = Path(self.out_root)
        paths = (root / SUMMARY_JSON, root / SUMMARY_CSV)
        for path, text in zip(paths, (json.dumps(self.as_dict(), indent=2) + "\n", self.csv_text())):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        return paths


class Tracker:
    """The parent's view of every job; tells ``on_update`` and rewrites the summary files as jobs finish."""

    def __init__(self, jobs: Sequence[Job], root: Path, on_update: Callable[[tuple[JobResult, ...]], None] | None,
                 *, backend: str, workers: int, threads: int) -> None:
        self.states = {job.name: JobResult(job.name, job.source, output_dir=str(model_dir(job, root)),
                                           log=str(log_path(job, root))) for job in jobs}
        self.root, self.on_update, self.start, self.written = root, on_update, time.perf_counter(), 0.0
        self.settings = {"backend": backend, "workers": workers, "threads_per_worker": threads}

    def update(self, name: str, **changes: Any) -> None:
        state = self.states[name]
        if state.status in FINAL:
            return  # a late "started" or "stage" message of a finished job
        self.states[name] = replace(state, **changes)
        self.notify()

    def finish(self, result: JobResult) -> None:
        if self.states[result.name].status in FINAL:
            return
        self.states[result.name] = replace(result, output_dir=result.output_dir or self.states[result.name].output_dir,
                                           log=result.log or self.states[result.name].log, stage="")
        if time.perf_counter() - self.written > _WRITE_EVERY:  # a batch killed outright still leaves a summary
            self.summary().write()
            self.written = time.perf_counter()
        self.notify()

    def not_started(self, state: JobResult) -> JobResult:
        """``state`` as a job that never started, saying which failure stopped the batch if one did."""
        failed = [s.name for s in self.states.values() if s.status == "failed"]
        why = f"not started: job {failed[0]} failed (pass --continue-on-error to go on)" if failed else "not started"
        return replace(state, status="cancelled", error=why)

    def summary(self, *, interrupted: bool = False) -> BatchSummary:
        # A job a worker refused after the stop flag can come back before the failure that raised the flag:
        # say why it did not start once every result is in.
        failed = [s.name for s in self.states.values() if s.status == "failed"]
        for name, state in self.states.items():
            if failed and state.status == "cancelled" and state.error == "not started":
                self.states[name] = replace(state, error=f"not started: job {failed[0]} failed "
                                                         "(pass --continue-on-error to go on)")
        return BatchSummary(jobs=tuple(self.states.values()), out_root=str(self.root),
                            wall_seconds=time.perf_counter() - self.start, interrupted=interrupted, **self.settings)

    def notify(self) -> None:
        if self.on_update is not None:
            self.on_update(tuple(self.states.values()))
