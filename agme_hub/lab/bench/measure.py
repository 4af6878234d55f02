"""Measuring a defence: the peak memory it adds, and the forward-pass floor its time is compared with."""

from __future__ import annotations

import copy
import ctypes
import gc
import threading
import time

import torch

from ...constants import DEFAULT_AUGMENT_COPIES
from ...data import ImageSet, Preprocessor
from ...devices import model_device, pick_batch_size, resolve_device, synchronize
from ...engine.edit import augmented_pairs
from ...triggers import Trigger

__all__ = ["PeakMemory", "forward_floor"]


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory added by a block, in MiB (``None`` where it cannot be measured).

    Two lower bounds of the true peak, of which the larger is kept: (1) the kernel's high-water mark
    of the resident set, reset on entry (``echo 5 > /proc/self/clear_refs``), minus the resident set at
    entry; (2) the anonymous resident memory (``RssAnon``: heap and tensors, not mapped files), sampled
    every 2 ms by a thread, minus its value at entry. (1) catches peaks too brief to sample but counts
    shared-library pages the kernel drops under memory pressure against the block; (2) does not.
    """

    def __init__(self) -> None:
        self.method = "none"
        self.peak_mb: float | None = None
        self._base_rss = self._base_anon = self._max_anon = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _malloc_trim()
        rss, anon = _status_kb("VmRSS"), _status_kb("RssAnon")
        if rss is None:
            return self
        self._base_rss = rss
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._hwm = True
        except OSError:
            pass
        if anon is not None:
            self._base_anon = self._max_anon = anon
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        methods = (["VmHWM after clear_refs"] if self._hwm else []) + (["RssAnon sampled every 2 ms"] if anon else [])
        self.method = " | ".join(methods) or "none"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            now = _status_kb("RssAnon")
            if now is not None and now > self._max_anon:
                self._max_anon = now

    def __exit__(self, *exc: object) -> None:
        bounds = []
        if self._hwm:
            peak = _status_kb("VmHWM")
            if peak is not None:
                bounds.append(peak - self._base_rss)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            bounds.append(max(self._max_anon, _status_kb("RssAnon") or 0) - self._base_anon)
        self.peak_mb = max(0, max(bounds)) / 1024 if bounds else None


@torch.inference_mode()
def forward_floor(model: torch.nn.Module, data: ImageSet, trigger: Trigger, *, copies: int | None = None,
                  seed: int = 0, device: str | None = None, batch_size: int | None = None) -> tuple[float, int]:
    """Seconds of plain forward passes over D and T(D) with the engine's augmented copies; and the image count.

    The images are the ones the edit reads (same augmentation, same pairing, same batches, on the same
    device as ``agme_hub.clean(..., device=device, batch_size=batch_size)``); building them and moving them
    to the device is not timed, only the passes, so this is the floor any method that looks at these
    activations pays.
    """
    copies = DEFAULT_AUGMENT_COPIES if copies is None else copies
    preprocess = Preprocessor.from_model(model)
    run_on = resolve_device(device) if device is not None else model_device(model)
    if run_on != model_device(model):
        model = copy.deepcopy(model).to(run_on)
    model.eval()
    pairs = max(1, pick_batch_size(batch_size, run_on, preprocess.input_size) // 2)
    batches = [torch.cat([preprocess(b.clean), preprocess(b.triggered)]).to(run_on)
               for b in augmented_pairs(data.images, data.labels, trigger, copies=copies, seed=seed, batch_size=pairs)]
    synchronize(run_on)
    start = time.perf_counter()
    for x in batches:
        model(x)
    synchronize(run_on)  # CUDA runs asynchronously: wait for the passes before reading the clock
    return time.perf_counter() - start, sum(len(x) for x in batches)
