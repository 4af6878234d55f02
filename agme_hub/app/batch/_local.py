"""The local backend: jobs on a pool of spawned worker processes on this machine."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

from ._signals import INTERRUPT_JOB, POLL, STOP_GRACE, sigint_ignored
from ._worker import execute, init_local_worker
from .jobs import Job, log_path, model_dir
from .summary import JobResult, Tracker


def run_local(tracker: Tracker, todo: list[tuple[Job, str, str]], pressed: threading.Event, *, workers: int,
              threads: int, continue_on_error: bool) -> None:
    """Jobs on a pool of spawned worker processes; after Ctrl-C the running jobs are interrupted and clean up."""
    context = multiprocessing.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    futures: dict[Future[JobResult], Job] = {}
    pids: dict[str, int] = {}  # running job -> its worker's pid
    interrupted: set[str] = set()
    executor = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                                   initializer=init_local_worker, initargs=(events, stop, not continue_on_error))

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
        done, pending = wait(pending, timeout=POLL, return_when=FIRST_COMPLETED)
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
        with sigint_ignored():  # the workers start here, and are born ignoring Ctrl-C
            for job, mode, note in todo:
                future = executor.submit(execute, job, str(model_dir(job, tracker.root)),
                                         str(log_path(job, tracker.root)), mode, note, threads)
                futures[future] = job
        pending = set(futures)
        while pending and not pressed.is_set():
            pending = step(pending)
        if pressed.is_set():
            stop.set()
            for future in pending:
                future.cancel()
            deadline = time.monotonic() + STOP_GRACE
            while pending and time.monotonic() < deadline:
                for name, pid in pids.items():
                    if name not in interrupted:  # also a job that started as the batch was stopping
                        interrupted.add(name)
                        with contextlib.suppress(OSError):
                            os.kill(pid, INTERRUPT_JOB)
                pending = step(pending)
            for pid in pids.values() if pending else ():  # still running after the grace time: stuck
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    finally:
        with sigint_ignored():
            executor.shutdown(wait=True, cancel_futures=True)
            events.close()


def _future_result(future: Future[JobResult], job: Job, tracker: Tracker) -> JobResult:
    state = tracker.states[job.name]
    if future.cancelled():
        return tracker.not_started(state)
    error = future.exception()
    if error is None:
        result = future.result()
        return tracker.not_started(result) if result.status == "cancelled" else result
    if isinstance(error, KeyboardInterrupt):
        return replace(state, status="interrupted", error="interrupted (Ctrl-C)")
    if isinstance(error, BrokenProcessPool):
        if state.status != "running":
            return replace(state, status="cancelled", error="not started: a worker process died")
        return replace(state, status="failed", exit_code=1,
                       error="its worker process died (killed, or out of memory); see job.log")
    return replace(state, status="failed", exit_code=1, error=f"{type(error).__name__}: {error}")
