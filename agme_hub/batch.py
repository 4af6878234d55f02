"""Batch cleaning: many models from one jobs file, on local worker processes or Ray tasks, resumable.

``load_jobs(path)`` reads and validates a jobs file; ``run(jobs, out_root=...)`` runs the jobs and returns a
:class:`BatchSummary`. ``agme batch`` is these two calls plus a live table::

    from agme_hub import batch
    summary = batch.run(batch.load_jobs("jobs.yaml"), out_root="cleaned", workers=2, resume=True)
    summary.ok  # True when every job is complete (or was already)

A jobs file (YAML or JSON) holds ``defaults`` and ``jobs``; each entry is a ``source``, an optional ``name`` and
any field of :class:`~agme_hub.options.CleanOptions` (the options of ``agme clean``)::

    defaults: {data: fashion-mnist, per_class: 10}
    jobs:
      - {source: org/model-a, trigger: badnets-white-br, target: 0}
      - {source: ./models/b, name: b-strong, lam: 0.1, push_to: org/b-agme}
      - org/model-c            # a bare source takes the defaults

Each job gets ``<out_root>/<name>/`` with the output model folder ``model/`` (written atomically by
:func:`~agme_hub.pipeline.run_clean`) and ``job.log``; ``summary.json`` and ``summary.csv`` sit in ``out_root``
and are rewritten as jobs finish. With ``backend="ray"`` the jobs run as Ray tasks: ``out_root`` and the
sources must then be paths that every node sees (a shared file system), and agme must be installed there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields, replace
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from .constants import REPORT_NAME, WEIGHTS_NAME
from .errors import AgmeError, JobsFileError, UsageError
from .options import CleanOptions

__all__ = ["Job", "JobResult", "BatchSummary", "load_jobs", "parse_jobs", "run", "BACKENDS", "MODEL_DIR",
           "LOG_NAME", "SUMMARY_JSON", "SUMMARY_CSV"]

_logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
MODEL_DIR = "model"  # the output model folder inside a job's folder
LOG_NAME = "job.log"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
_LOCK_NAME = ".agme-batch.lock"
SUCCEEDED = frozenset({"complete", "skipped", "dry-run"})
FINAL = SUCCEEDED | {"failed", "cancelled", "interrupted"}
_METRICS = ("clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_OPTION_FIELDS = tuple(f.name for f in fields(CleanOptions))
# Options that do not change the cleaned weights: a complete job whose report differs only here is still done.
_NOT_RESULT = frozenset({"out", "yes", "dry_run", "offline", "push_to", "create_pr", "private"})
_STOP_GRACE = 20.0  # seconds an interrupted job gets to clean up before its worker is killed
_POLL = 0.25  # seconds between two looks at the running jobs
_WRITE_EVERY = 2.0  # seconds between two rewrites of the summary files while jobs finish


# ------------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One model to clean: ``Job("org/model", CleanOptions(data="fashion-mnist", target="0"), name="model")``.

    ``name`` names the job's folder under ``out_root``; empty means derived from ``source``.
    """

    source: str
    options: CleanOptions = field(default_factory=CleanOptions)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", default_name(self.source))


def default_name(source: str) -> str:
    """``org/model@v2`` -> ``model``; ``./models/b/`` -> ``b``: the last part of the source, made a safe name."""
    last = source.removeprefix("hf-hub:").removeprefix("local-dir:").replace("\\", "/").rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last.split("@")[0]).strip("-.") or "job"


def load_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """Read a jobs file (``.json`` as JSON, anything else as YAML) and validate every entry before anything runs.

    Raises:
        JobsFileError: unreadable file, bad syntax, or an invalid entry; the message names the entry and the field.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise JobsFileError(f"cannot read the jobs file {path}: {err.strerror or err}") from None
    as_json = path.suffix.lower() == ".json"
    try:
        document = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        first = str(err).replace("\n", " ")
        raise JobsFileError(f"{path}: not valid {'JSON' if as_json else 'YAML'}: {first}") from None
    return parse_jobs(document, where=str(path))


def parse_jobs(document: Any, *, where: str = "jobs") -> list[Job]:
    """Jobs from a parsed jobs file (``{"defaults": {...}, "jobs": [...]}``); see :func:`load_jobs`."""
    if not isinstance(document, dict):
        raise JobsFileError(f"{where}: expected a mapping with 'jobs' (and optionally 'defaults'), "
                            f"got {type(document).__name__}")
    for key in document:
        if key not in ("defaults", "jobs"):
            raise JobsFileError(f"{where}: unknown top-level key {key!r}; a jobs file holds 'defaults' and 'jobs'")
    defaults = _fields(document.get("defaults") or {}, f"{where}: defaults", allowed=_OPTION_FIELDS)
    entries = document.get("jobs")
    if not isinstance(entries, list) or not entries:
        raise JobsFileError(f"{where}: 'jobs' must be a non-empty list of entries (each a source and options)")
    jobs = []
    for index, entry in enumerate(entries):
        label = f"{where}: jobs[{index}]"
        entry = {"source": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise JobsFileError(f"{label}: expected a source or a mapping of fields, got {type(entry).__name__}")
        source, name = entry.get("source"), entry.get("name")
        if not isinstance(source, str) or not source.strip():
            raise JobsFileError(f"{label}: field 'source' is required (a Hub repo id, timm name or local folder)")
        if name is not None and not isinstance(name, str):
            raise JobsFileError(f"{label}: field 'name' must be a string, got {name!r}")
        label = f"{label} ({name or default_name(source)})"
        values = _fields({k: v for k, v in entry.items() if k not in ("source", "name")}, label,
                         allowed=_OPTION_FIELDS)
        jobs.append(Job(source=source, options=_options({**defaults, **values}, label), name=name or ""))
    check_jobs(jobs, where=where)
    return jobs


def _fields(values: Any, label: str, *, allowed: Sequence[str]) -> dict[str, Any]:
    """Keys normalized to field names (``per-class`` -> ``per_class``); an unknown key suggests the closest."""
    if not isinstance(values, dict):
        raise JobsFileError(f"{label}: expected a mapping of field names to values, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            close = get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (the fields are those of `agme clean`)"
            raise JobsFileError(f"{label}: unknown field {key!r}{hint}")
        out[name] = value
    return out


def _options(values: dict[str, Any], label: str) -> CleanOptions:
    from .triggers import parse_trigger

    try:
        options = CleanOptions.from_dict(values, where=label)
    except UsageError as err:
        message = str(err)
        raise JobsFileError(message if message.startswith(label) else f"{label}: {message}") from None
    if options.trigger is not None:
        try:
            parse_trigger(options.trigger)
        except AgmeError as err:
            raise JobsFileError(f"{label}: field 'trigger': {err}") from None
    return options


def check_jobs(jobs: Sequence[Job], *, where: str = "jobs") -> None:
    """Names are unique folder names, every job has data, no two jobs write the same output folder."""
    seen: dict[str, int] = {}
    outs: dict[str, int] = {}
    for index, job in enumerate(jobs):
        label = f"{where}: jobs[{index}] ({job.name})"
        if not _NAME_RE.match(job.name) or job.name in (SUMMARY_JSON, SUMMARY_CSV):
            raise JobsFileError(f"{label}: field 'name' {job.name!r} is not a usable folder name "
                                f"(letters, digits, '.', '_' and '-')")
        if job.name in seen:
            raise JobsFileError(f"{label}: name {job.name!r} is already used by jobs[{seen[job.name]}]; "
                                f"give each entry a unique 'name'")
        seen[job.name] = index
        if not job.options.data:
            raise JobsFileError(f"{label}: field 'data' is required (an image folder, an .npz or a built-in "
                                f"dataset), in the entry or in 'defaults'")
        if job.options.out:
            out = str(Path(job.options.out).expanduser().resolve())
            if out in outs:
                raise JobsFileError(f"{label}: field 'out' is the output folder of jobs[{outs[out]}] too")
            outs[out] = index


# ---------------------------------------------------------------------------------------------- results
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
        from . import __version__

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


class _Tracker:
    """The parent's view of every job; tells ``on_update`` and rewrites the summary files as jobs finish."""

    def __init__(self, jobs: Sequence[Job], root: Path, on_update: Callable[[tuple[JobResult, ...]], None] | None,
                 *, backend: str, workers: int, threads: int) -> None:
        self.states = {job.name: JobResult(job.name, job.source, output_dir=str(_model_dir(job, root)),
                                           log=str(root / job.name / LOG_NAME)) for job in jobs}
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


# -------------------------------------------------------------------------------------------------- run
def run(
    jobs: Sequence[Job] | str | os.PathLike[str],
    *,
    out_root: str | os.PathLike[str],
    workers: int | None = None,
    resume: bool = False,
    continue_on_error: bool = False,
    backend: str = "local",
    address: str | None = None,
    threads_per_worker: int | None = None,
    on_update: Callable[[tuple[JobResult, ...]], None] | None = None,
) -> BatchSummary:
    """Run every job (each one :func:`~agme_hub.pipeline.run_clean`) and return what happened.

    Args:
        jobs: the jobs, or the path of a jobs file.
        out_root: the folder of the job folders and of ``summary.json`` / ``summary.csv``.
        workers: local worker processes (default 1); with Ray, tasks in flight (default: the cluster's CPUs).
        resume: skip a job whose output folder is complete: its report says so, the sha256 of its weights
            matches the report, and its source and options are the job's; a complete job not yet pushed is pushed.
        continue_on_error: record a failed job and go on; otherwise no new job starts after a failure (running
            jobs finish).
        backend: ``local`` (processes on this machine) or ``ray`` (tasks on a Ray cluster).
        address: the Ray cluster to connect to when Ray is not initialized yet (default: Ray's own resolution,
            ``RAY_ADDRESS`` or a cluster started on this machine).
        threads_per_worker: torch threads of each job (default: this process's torch threads / workers).
        on_update: called with every job's state whenever one changes (for a live display).

    Returns:
        The summary, also written as ``summary.json`` and ``summary.csv`` in ``out_root``.

    Raises:
        JobsFileError: invalid jobs (before anything runs).
        UsageError: bad arguments, Ray missing or unreachable, or another batch writing to ``out_root``.
        KeyboardInterrupt: after Ctrl-C, once running jobs have stopped and cleaned up and the summary is written.
    """
    import torch

    if isinstance(jobs, (str, os.PathLike)):
        jobs = load_jobs(jobs)
    jobs = [_absolute(job) for job in jobs]
    check_jobs(jobs, where="batch")
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if address is not None and backend != "ray":
        raise UsageError("--address applies to --backend ray only")
    if workers is not None and workers < 1:
        raise UsageError(f"--jobs must be at least 1, got {workers}")
    ray = _import_ray() if backend == "ray" else None
    if threads_per_worker is not None and threads_per_worker < 1:
        raise UsageError(f"threads_per_worker must be at least 1, got {threads_per_worker}")
    # Local workers share this machine's torch threads; a Ray task asks the cluster for one CPU per thread.
    threads = threads_per_worker or (max(1, torch.get_num_threads() // (workers or 1)) if ray is None else 1)
    root = Path(out_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        tracker = _Tracker(jobs, root, on_update, backend=backend, workers=workers or 1, threads=threads)
        todo: list[tuple[Job, str, str]] = []
        for job in jobs:
            model_dir = _model_dir(job, root)
            _sweep(model_dir)
            state, why = _resume_state(job, model_dir) if resume else ("run", "")
            if state == "done":
                tracker.finish(_skipped(job, model_dir, root))
            else:
                todo.append((job, state, why))
        tracker.notify()
        with _ctrl_c() as pressed:
            if todo and ray is not None:
                _run_ray(ray, tracker, todo, pressed, workers=workers, threads=threads, address=address,
                         continue_on_error=continue_on_error)
            elif todo:
                _run_local(tracker, todo, pressed, workers=workers or 1, threads=threads,
                           continue_on_error=continue_on_error)
        interrupted = pressed.is_set()
        with _sigint_ignored():
            for job in jobs:
                state = tracker.states[job.name]
                if state.status not in FINAL:
                    tracker.finish(replace(state, status="interrupted" if state.status == "running" else "cancelled",
                                           error="interrupted (Ctrl-C)"))
                if not tracker.states[job.name].ok:
                    _sweep(_model_dir(job, root))
            summary = tracker.summary(interrupted=interrupted)
            summary.write()
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _model_dir(job: Job, root: Path) -> Path:
    return Path(job.options.out) if job.options.out else root / job.name / MODEL_DIR


def _absolute(job: Job) -> Job:
    """Local paths made absolute, so that workers whose working folder differs (Ray tasks) find them."""
    from .data import BUILTIN_DATASETS

    def local(value: str | None) -> str | None:
        if not value or value.partition(":")[0] in BUILTIN_DATASETS or not Path(value).expanduser().exists():
            return value
        return str(Path(value).expanduser().resolve())

    changes = {name: local(getattr(job.options, name)) for name in ("data", "eval_data", "trigger")}
    if job.options.out:
        changes["out"] = str(Path(job.options.out).expanduser().resolve())
    return Job(source=local(job.source) or job.source, options=job.options.replace(**changes), name=job.name)


def _sweep(model_dir: Path) -> None:
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


def _options_record(options: CleanOptions) -> dict[str, Any]:
    """The options as run_clean writes them into the report, less those that do not change the weights."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.public_dict().items()
            if k not in _NOT_RESULT}


def _read_report(model_dir: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((model_dir / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _resume_state(job: Job, model_dir: Path) -> tuple[str, str]:
    """``("done" | "push" | "run", why)`` for a job whose output folder may already be complete."""
    from .checkpoint import sha256_file

    report = _read_report(model_dir)
    if report is None:
        return "run", "no report yet"
    if report.get("status") != "complete":
        return "run", f"the report says {report.get('status')!r}"
    weights = model_dir / WEIGHTS_NAME
    expected = (report.get("provenance") or {}).get("weights_sha256")
    if not weights.is_file() or not expected or sha256_file(weights) != expected:
        return "run", "the weights do not match the sha256 in the report"
    recorded = {k: v for k, v in (report.get("options") or {}).items() if k not in _NOT_RESULT}
    if report.get("source") != job.source or recorded != _options_record(job.options):
        return "run", "the source or the options changed since the complete run"
    if job.options.push_to and (report.get("push") or {}).get("repo_id") != job.options.push_to:
        return "push", f"complete but not pushed to {job.options.push_to} yet"
    return "done", "complete"


def _skipped(job: Job, model_dir: Path, root: Path) -> JobResult:
    report = _read_report(model_dir) or {}
    return JobResult(job.name, job.source, status="skipped", output_dir=str(model_dir),
                     log=str(root / job.name / LOG_NAME), before=report.get("before"), after=report.get("after"),
                     push_url=_push_url(report))


def _push_url(record: dict[str, Any]) -> str | None:
    push = record.get("push") or {}
    return push.get("pr_url") or push.get("commit_url")


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Refuse a second batch writing into the same ``out_root`` at the same time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / _LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another agme batch is writing to {root}; wait for it or choose another --out-root") \
                from None
        yield


@contextlib.contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C sets the yielded event instead of raising KeyboardInterrupt at a random place: the loops that wait
    for jobs check it and stop the batch in order."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored in this block; worker processes started inside it are born ignoring it too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------- one job
_EVENTS: Any = None  # a multiprocessing queue to the parent, in local worker processes
_STOP: Any = None  # a multiprocessing event: once set, no job may start
_STOP_ON_FAILURE = False  # a failed job sets _STOP itself, so that no worker starts a queued job meanwhile
_BUSY = False


# The parent sends this to a worker to interrupt its running job (SIGTERM stays the pool's way to end a worker).
_INTERRUPT_JOB = getattr(signal, "SIGUSR1", signal.SIGTERM)


def _init_local_worker(events: Any, stop: Any, stop_on_failure: bool) -> None:
    """Worker process setup: Ctrl-C is the parent's to handle; _INTERRUPT_JOB interrupts the running job."""
    global _EVENTS, _STOP, _STOP_ON_FAILURE
    _EVENTS, _STOP, _STOP_ON_FAILURE = events, stop, stop_on_failure
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(_INTERRUPT_JOB, _on_interrupt)
    sys.stdout = sys.stderr  # stdout belongs to the parent (agme batch --json)


def _on_interrupt(signum: int, frame: Any) -> None:
    if _BUSY:  # between jobs there is nothing to interrupt
        raise KeyboardInterrupt  # unwinds run_clean: atomic_output_dir removes its temporary folder


def _emit(kind: str, name: str, payload: Any) -> None:
    if _EVENTS is not None:
        with contextlib.suppress(Exception):
            _EVENTS.put((kind, name, payload))


class _ScrubbingWriter:
    """A text stream that writes through to ``handle`` with every known token replaced by ``***``."""

    def __init__(self, handle: Any, tokens: list[str]) -> None:
        self._handle, self._tokens = handle, tokens

    def write(self, text: str) -> int:
        from .redact import scrub

        self._handle.write(scrub(text, self._tokens))
        return len(text)

    def flush(self) -> None:
        self._handle.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@contextlib.contextmanager
def _job_log(path: Path, token: str | None = None) -> Iterator[Callable[[str], None]]:
    """Everything the job says (its stages, warnings, prints, logging, traceback) goes to its ``job.log``,
    with every token agme knows of (the job's own, HF_TOKEN, the saved login) scrubbed."""
    from .redact import known_tokens

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as raw_handle:
        handle = _ScrubbingWriter(raw_handle, known_tokens(token))
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root_logger = logging.getLogger()
        root_logger.addHandler(handler)
        logging.captureWarnings(True)

        def log(line: str) -> None:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                yield log
        finally:
            logging.captureWarnings(False)
            root_logger.removeHandler(handler)


def _execute(job: Job, model_dir: str, log_path: str, mode: str, note: str, threads: int) -> JobResult:
    """Run one job in this process (a local worker or a Ray task). The job's own failures become its result."""
    global _BUSY
    from .redact import known_tokens, scrub

    base = JobResult(job.name, job.source, output_dir=model_dir, log=log_path)
    if _STOP is not None and _STOP.is_set():
        return replace(base, status="cancelled", error="not started")
    worker, start = f"{socket.gethostname()}:{os.getpid()}", time.time()
    _BUSY = True
    _emit("start", job.name, {"pid": os.getpid(), "worker": worker, "started_at": start})
    base = replace(base, worker=worker, started_at=start)
    try:
        with _job_log(Path(log_path), job.options.token) as log:
            log(f"job {job.name}: {job.source} on {worker}" + (f" (resume: {note})" if note else ""))
            try:
                record = _work(job, Path(model_dir), mode, threads, log)
            except KeyboardInterrupt:
                log("interrupted; the output folder was left as it was before this job")
                return replace(base, status="interrupted", seconds=time.time() - start, error="interrupted (Ctrl-C)")
            except Exception as err:  # noqa: BLE001 - any failure of one job is that job's result
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                if not isinstance(err, AgmeError):
                    message = f"{type(err).__name__}: {message}"
                message = scrub(message, known_tokens(job.options.token))
                log(f"failed: {message}\n{traceback.format_exc()}")  # the log's writer scrubs the traceback
                if _STOP is not None and _STOP_ON_FAILURE:
                    _STOP.set()
                return replace(base, status="failed", seconds=time.time() - start, error=message,
                               exit_code=getattr(err, "exit_code", 1))
            seconds = time.time() - start
            log(f"{record['status']} in {seconds:.1f} s; output: {record.get('output_dir')}")
            return replace(base, status=record["status"], seconds=seconds, before=record.get("before"),
                           after=record.get("after"), push_url=_push_url(record))
    finally:
        _BUSY = False


def _work(job: Job, model_dir: Path, mode: str, threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from .pipeline import push_output, run_clean

    torch.set_num_threads(threads)
    options = job.options
    if mode == "push":
        log(f"pushing the complete output to {options.push_to}")
        return push_output(model_dir, str(options.push_to), token=options.token, private=options.private,
                           create_pr=options.create_pr)

    def report(line: str) -> None:
        log(line)
        _emit("stage", job.name, line)

    return run_clean(job.source, options.replace(out=str(model_dir)), report=report)


# ----------------------------------------------------------------------------------------------- local
def _run_local(tracker: _Tracker, todo: list[tuple[Job, str, str]], pressed: threading.Event, *, workers: int,
               threads: int, continue_on_error: bool) -> None:
    """Jobs on a pool of spawned worker processes; after Ctrl-C the running jobs are interrupted and clean up."""
    context = multiprocessing.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    futures: dict[Future[JobResult], Job] = {}
    pids: dict[str, int] = {}  # running job -> its worker's pid
    interrupted: set[str] = set()
    executor = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                                   initializer=_init_local_worker, initargs=(events, stop, not continue_on_error))

    def step(pending: set[Future[JobResult]]) -> set[Future[JobResult]]:
        while True:  # what the workers said: a job started (on which pid), a job's stage
            try:
                kind, name, payload = events.get_nowait()
            except queue.Empty:
                break
            if kind == "start":
                pids[name] = payload["pid"]
                tracker.update(name, status="running", worker=payload["worker"], started_at=payload["started_at"])
            else:
                tracker.update(name, stage=payload)
        done, pending = wait(pending, timeout=_POLL, return_when=FIRST_COMPLETED)
        for future in done:
            job = futures[future]
            pids.pop(job.name, None)
            result = _future_result(future, job, tracker)
            tracker.finish(result)
            if result.status == "failed" and not continue_on_error and not stop.is_set():
                stop.set()  # queued jobs are cancelled; running ones finish
                for other in futures:
                    other.cancel()
        return pending

    try:
        with _sigint_ignored():  # the workers start here, and are born ignoring Ctrl-C
            for job, mode, note in todo:
                future = executor.submit(_execute, job, str(_model_dir(job, tracker.root)),
                                         str(tracker.root / job.name / LOG_NAME), mode, note, threads)
                futures[future] = job
        pending = set(futures)
        while pending and not pressed.is_set():
            pending = step(pending)
        if pressed.is_set():
            stop.set()
            for future in pending:
                future.cancel()
            deadline = time.monotonic() + _STOP_GRACE
            while pending and time.monotonic() < deadline:
                for name, pid in pids.items():
                    if name not in interrupted:  # also a job that started as the batch was stopping
                        interrupted.add(name)
                        with contextlib.suppress(OSError):
                            os.kill(pid, _INTERRUPT_JOB)
                pending = step(pending)
            for pid in pids.values() if pending else ():  # still running after the grace time: stuck
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    finally:
        with _sigint_ignored():
            executor.shutdown(wait=True, cancel_futures=True)
            events.close()


def _not_started(tracker: _Tracker, state: JobResult) -> JobResult:
    failed = [s.name for s in tracker.states.values() if s.status == "failed"]
    why = f"not started: job {failed[0]} failed (pass --continue-on-error to go on)" if failed else "not started"
    return replace(state, status="cancelled", error=why)


def _future_result(future: Future[JobResult], job: Job, tracker: _Tracker) -> JobResult:
    state = tracker.states[job.name]
    if future.cancelled():
        return _not_started(tracker, state)
    error = future.exception()
    if error is None:
        result = future.result()
        return _not_started(tracker, result) if result.status == "cancelled" else result
    if isinstance(error, KeyboardInterrupt):
        return replace(state, status="interrupted", error="interrupted (Ctrl-C)")
    if isinstance(error, BrokenProcessPool):
        if state.status != "running":
            return replace(state, status="cancelled", error="not started: a worker process died")
        return replace(state, status="failed", exit_code=1,
                       error="its worker process died (killed, or out of memory); see job.log")
    return replace(state, status="failed", exit_code=1, error=f"{type(error).__name__}: {error}")


# ------------------------------------------------------------------------------------------------- ray
def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs the ray package: pip install 'ray>=2.9' "
                         "(or use the default --backend local)") from None
    return ray


def _run_ray(ray: Any, tracker: _Tracker, todo: list[tuple[Job, str, str]], pressed: threading.Event, *,
             workers: int | None, threads: int, address: str | None, continue_on_error: bool) -> None:
    """Jobs as Ray tasks, at most ``workers`` in flight; after Ctrl-C the running tasks are cancelled and clean up."""
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as err:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError ... from Ray
            raise UsageError(f"cannot connect to the Ray cluster{f' at {address}' if address else ''}: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    elif address is not None:
        _logger.warning("Ray is already initialized in this process; --address %s is not used", address)
    task = ray.remote(num_cpus=threads, max_retries=0)(_execute)
    capacity = workers or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    tracker.settings["workers"] = capacity
    waiting, inflight, stopping = list(todo), {}, False
    try:
        while (waiting or inflight) and not pressed.is_set():
            while waiting and len(inflight) < capacity and not stopping:
                job, mode, note = waiting.pop(0)
                ref = task.remote(job, str(_model_dir(job, tracker.root)), str(tracker.root / job.name / LOG_NAME),
                                  mode, note, threads)
                inflight[ref] = job
                tracker.update(job.name, status="running", started_at=time.time(), worker="ray")
            if stopping:
                for job, _, _ in waiting:
                    tracker.finish(_not_started(tracker, tracker.states[job.name]))
                waiting.clear()
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL) if inflight else ([], [])
            for ref in done:
                result = _ray_result(ray, ref, inflight.pop(ref), tracker)
                tracker.finish(result)
                stopping = stopping or (result.status == "failed" and not continue_on_error)
        if pressed.is_set():
            for ref in inflight:
                ray.cancel(ref)  # raises KeyboardInterrupt inside the task: its output folder is cleaned up
            for ref, job in inflight.items():
                tracker.finish(_ray_result(ray, ref, job, tracker, timeout=_STOP_GRACE))
    finally:
        if started_here:
            with _sigint_ignored():
                ray.shutdown()


def _ray_result(ray: Any, ref: Any, job: Job, tracker: _Tracker, timeout: float | None = None) -> JobResult:
    state = tracker.states[job.name]
    try:
        return ray.get(ref, timeout=timeout)
    except (ray.exceptions.TaskCancelledError, ray.exceptions.GetTimeoutError):
        return replace(state, status="interrupted", error="interrupted (Ctrl-C)")
    except Exception as err:  # noqa: BLE001 - a worker crash or a lost node is this job's failure
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return replace(state, status="failed", exit_code=1, error=f"Ray task failed: {first}")
