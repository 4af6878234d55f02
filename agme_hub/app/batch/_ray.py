"""The Ray backend: jobs as Ray tasks on a cluster whose nodes share ``out_root`` and the sources."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

from ...errors import UsageError
from ._signals import POLL, STOP_GRACE, sigint_ignored
from ._worker import execute
from .jobs import Job, log_path, model_dir
from .summary import JobResult, Tracker

# The logger of the package, as when the batch was one module: the warning reads the same in a user's log.
_logger = logging.getLogger(__package__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs the ray package: pip install 'ray>=2.9' "
                         "(or use the default --backend local)") from None
    return ray


def run_ray(ray: Any, tracker: Tracker, todo: list[tuple[Job, str, str]], pressed: threading.Event, *,
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
    task = ray.remote(num_cpus=threads, max_retries=0)(execute)
    capacity = workers or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    tracker.settings["workers"] = capacity
    waiting, inflight, stopping = list(todo), {}, False
    try:
        while (waiting or inflight) and not pressed.is_set():
            while waiting and len(inflight) < capacity and not stopping:
                job, mode, note = waiting.pop(0)
                ref = task.remote(job, str(model_dir(job, tracker.root)), str(log_path(job, tracker.root)),
                                  mode, note, threads)
                inflight[ref] = job
                tracker.update(job.name, status="running", started_at=time.time(), worker="ray")
            if stopping:
                for job, _, _ in waiting:
                    tracker.finish(tracker.not_started(tracker.states[job.name]))
                waiting.clear()
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL) if inflight else ([], [])
            for ref in done:
                result = _ray_result(ray, ref, inflight.pop(ref), tracker)
                tracker.finish(result)
                stopping = stopping or (result.status == "failed" and not continue_on_error)
        if pressed.is_set():
            for ref in inflight:
                ray.cancel(ref)  # raises KeyboardInterrupt inside the task: its output folder is cleaned up
            for ref, job in inflight.items():
                tracker.finish(_ray_result(ray, ref, job, tracker, timeout=STOP_GRACE))
    finally:
        if started_here:
            with sigint_ignored():
                ray.shutdown()


def _ray_result(ray: Any, ref: Any, job: Job, tracker: Tracker, timeout: float | None = None) -> JobResult:
    state = tracker.states[job.name]
    try:
        return ray.get(ref, timeout=timeout)
    except (ray.exceptions.TaskCancelledError, ray.exceptions.GetTimeoutError):
        return replace(state, status="interrupted", error="interrupted (Ctrl-C)")
    except Exception as err:  # noqa: BLE001 - a worker crash or a lost node is this job's failure
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return replace(state, status="failed", exit_code=1, error=f"Ray task failed: {first}")
