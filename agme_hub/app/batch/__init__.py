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
:func:`~agme_hub.app.clean.run_clean`) and ``job.log``; ``summary.json`` and ``summary.csv`` sit in ``out_root``
and are rewritten as jobs finish. With ``backend="ray"`` the jobs run as Ray tasks: ``out_root`` and the
sources must then be paths that every node sees (a shared file system), and agme must be installed there.

By concern: :mod:`.jobs` (a job, the jobs file, a job's folders), :mod:`.summary` (results, the summary files,
the parent's tracker), :mod:`.resume` (what a killed or complete job left), ``_worker`` (one job inside a
worker), ``_local`` and ``_ray`` (the two backends), ``_signals`` (Ctrl-C and the out_root lock).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ...errors import UsageError
from ...options import CleanOptions as CleanOptions  # batch.CleanOptions: the options of one job, at hand
from ._local import run_local
from ._ray import import_ray, run_ray
from ._signals import ctrl_c, exclusive, sigint_ignored
from .jobs import LOG_NAME, MODEL_DIR, SUMMARY_CSV, SUMMARY_JSON, Job, absolute, check_jobs, default_name, load_jobs
from .jobs import model_dir, parse_jobs
from .resume import resume_state, skipped, sweep
from .summary import FINAL, SUCCEEDED, BatchSummary, JobResult, Tracker

# Kept under the names they had when the batch was one module (tests/test_batch.py reaches them).
_resume_state, _sweep = resume_state, sweep

__all__ = ["Job", "JobResult", "BatchSummary", "load_jobs", "parse_jobs", "check_jobs", "default_name", "run",
           "BACKENDS", "MODEL_DIR", "LOG_NAME", "SUMMARY_JSON", "SUMMARY_CSV", "SUCCEEDED", "FINAL"]

BACKENDS = ("local", "ray")


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
    """Run every job (each one :func:`~agme_hub.app.clean.run_clean`) and return what happened.

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
    jobs = [absolute(job) for job in jobs]
    check_jobs(jobs, where="batch")
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if address is not None and backend != "ray":
        raise UsageError("--address applies to --backend ray only")
    if workers is not None and workers < 1:
        raise UsageError(f"--jobs must be at least 1, got {workers}")
    ray = import_ray() if backend == "ray" else None
    if threads_per_worker is not None and threads_per_worker < 1:
        raise UsageError(f"threads_per_worker must be at least 1, got {threads_per_worker}")
    # Local workers share this machine's torch threads; a Ray task asks the cluster for one CPU per thread.
    threads = threads_per_worker or (max(1, torch.get_num_threads() // (workers or 1)) if ray is None else 1)
    root = Path(out_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root):
        tracker = Tracker(jobs, root, on_update, backend=backend, workers=workers or 1, threads=threads)
        todo: list[tuple[Job, str, str]] = []
        for job in jobs:
            folder = model_dir(job, root)
            sweep(folder)
            state, why = resume_state(job, folder) if resume else ("run", "")
            if state == "done":
                tracker.finish(skipped(job, folder, root))
            else:
                todo.append((job, state, why))
        tracker.notify()
        with ctrl_c() as pressed:
            if todo and ray is not None:
                run_ray(ray, tracker, todo, pressed, workers=workers, threads=threads, address=address,
                        continue_on_error=continue_on_error)
            elif todo:
                run_local(tracker, todo, pressed, workers=workers or 1, threads=threads,
                          continue_on_error=continue_on_error)
        interrupted = pressed.is_set()
        with sigint_ignored():
            for job in jobs:
                state = tracker.states[job.name]
                if state.status not in FINAL:
                    tracker.finish(replace(state, status="interrupted" if state.status == "running" else "cancelled",
                                           error="interrupted (Ctrl-C)"))
                if not tracker.states[job.name].ok:
                    sweep(model_dir(job, root))
            summary = tracker.summary(interrupted=interrupted)
            summary.write()
    if interrupted:
        raise KeyboardInterrupt
    return summary


