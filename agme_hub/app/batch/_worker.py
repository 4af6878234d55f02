"""One job, run inside a worker: a local worker process or a Ray task.

:func:`execute` is what the pool (or Ray) calls; it turns the job's own failures into its result and writes
everything the job says to its ``job.log``. What a worker process knows besides its job lives in one
:class:`WorkerState` object, :data:`STATE`, set up by :func:`init_local_worker` in a local worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import AgmeError, one_line
from ...redact import known_tokens, scrub
from ...report import CleanReport
from ..clean import push_output, run_clean
from ._signals import INTERRUPT_JOB
from .jobs import Job
from .resume import push_url
from .summary import JobResult


@dataclass
class WorkerState:
    """This process's part in a batch. In a Ray task all stay at their defaults: no events, no stop flag."""

    events: Any = None  # a multiprocessing queue to the parent, in local worker processes
    stop: Any = None  # a multiprocessing event: once set, no job may start
    stop_on_failure: bool = False  # a failed job sets `stop` itself, so that no worker starts a queued job meanwhile
    busy: bool = False  # a job is running: INTERRUPT_JOB has something to interrupt

    def emit(self, kind: str, name: str, payload: Any) -> None:
        """Tell the parent something about a job (it started, its stage); never fails the job."""
        if self.events is not None:
            with contextlib.suppress(Exception):
                self.events.put((kind, name, payload))


STATE = WorkerState()


def init_local_worker(events: Any, stop: Any, stop_on_failure: bool) -> None:
    """Worker process setup: Ctrl-C is the parent's to handle; INTERRUPT_JOB interrupts the running job."""
    STATE.events, STATE.stop, STATE.stop_on_failure = events, stop, stop_on_failure
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(INTERRUPT_JOB, _on_interrupt)
    sys.stdout = sys.stderr  # stdout belongs to the parent (agme batch --json)


def _on_interrupt(signum: int, frame: Any) -> None:
    if STATE.busy:  # between jobs there is nothing to interrupt
        raise KeyboardInterrupt  # unwinds run_clean: atomic_output_dir removes its temporary folder


class _ScrubbingWriter:
    """A text stream that writes through to ``handle`` with every known token replaced by ``***``."""

    def __init__(self, handle: Any, tokens: list[str]) -> None:
        self._handle, self._tokens = handle, tokens

    def write(self, text: str) -> int:
        self._handle.write(scrub(text, self._tokens))
        return len(text)

    def flush(self) -> None:
        self._handle.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@contextlib.contextmanager
def job_log(path: Path, token: str | None = None) -> Iterator[Callable[[str], None]]:
    """Everything the job says (its stages, warnings, prints, logging, traceback) goes to its ``job.log``,
    with every token agme knows of (the job's own, HF_TOKEN, the saved login) scrubbed."""
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


def execute(job: Job, model_dir: str, log_path: str, mode: str, note: str, threads: int) -> JobResult:
    """Run one job in this process (a local worker or a Ray task). The job's own failures become its result."""
    base = JobResult(job.name, job.source, output_dir=model_dir, log=log_path)
    if STATE.stop is not None and STATE.stop.is_set():
        return replace(base, status="cancelled", error="not started")
    worker, start = f"{socket.gethostname()}:{os.getpid()}", time.time()
    STATE.busy = True
    STATE.emit("start", job.name, {"pid": os.getpid(), "worker": worker, "started_at": start})
    base = replace(base, worker=worker, started_at=start)
    try:
        with job_log(Path(log_path), job.options.token) as log:
            log(f"job {job.name}: {job.source} on {worker}" + (f" (resume: {note})" if note else ""))
            try:
                report = _work(job, Path(model_dir), mode, threads, log)
            except KeyboardInterrupt:
                log("interrupted; the output folder was left as it was before this job")
                return replace(base, status="interrupted", seconds=time.time() - start, error="interrupted (Ctrl-C)")
            except Exception as err:  # noqa: BLE001 - any failure of one job is that job's result
                message = one_line(err)
                if not isinstance(err, AgmeError):
                    message = f"{type(err).__name__}: {message}"
                message = scrub(message, known_tokens(job.options.token))
                log(f"failed: {message}\n{traceback.format_exc()}")  # the log's writer scrubs the traceback
                if STATE.stop is not None and STATE.stop_on_failure:
                    STATE.stop.set()
                return replace(base, status="failed", seconds=time.time() - start, error=message,
                               exit_code=getattr(err, "exit_code", 1))
            seconds = time.time() - start
            log(f"{report.status} in {seconds:.1f} s; output: {report.output_dir}")
            measured = report.status == "complete"  # a dry run measures nothing
            return replace(base, status=str(report.status), seconds=seconds,
                           before=report.before.to_json() if measured else None,
                           after=report.after.to_json() if measured else None, push_url=push_url(report))
    finally:
        STATE.busy = False


def _work(job: Job, model_dir: Path, mode: str, threads: int, log: Callable[[str], None]) -> CleanReport:
    import torch

    torch.set_num_threads(threads)
    options = job.options
    if mode == "push":
        log(f"pushing the complete output to {options.push_to}")
        return push_output(model_dir, str(options.push_to), token=options.token, private=options.private,
                           create_pr=options.create_pr)

    def report(line: str) -> None:
        log(line)
        STATE.emit("stage", job.name, line)

    return run_clean(job.source, options.replace(out=str(model_dir)), report=report)
