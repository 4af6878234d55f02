"""Ctrl-C and the out_root lock: how the parent stops a batch in order, and keeps a second one out."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from ...errors import UsageError

_LOCK_NAME = ".agme-batch.lock"
STOP_GRACE = 20.0  # seconds an interrupted job gets to clean up before its worker is killed
POLL = 0.25  # seconds between two looks at the running jobs (and at Ctrl-C)

# The parent sends this to a worker to interrupt its running job (SIGTERM stays the pool's way to end a worker).
INTERRUPT_JOB = getattr(signal, "SIGUSR1", signal.SIGTERM)


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
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
def ctrl_c() -> Iterator[threading.Event]:
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
def sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored in this block; worker processes started inside it are born ignoring it too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
