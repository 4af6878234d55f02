"""Where the engine runs: device specs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) and batch sizes.

``resolve_device("auto")`` is CUDA when present, else the CPU; a device that is not there, or a spec that
is not one of these, is a :class:`~agme_hub.errors.DeviceError` (one line, before anything is loaded or
written). Gram statistics and the solve are float64; MPS has no float64, so there they stay on the CPU
(:func:`stats_device`).
"""

from __future__ import annotations

import re

import torch

from .errors import DeviceError, UsageError

__all__ = ["DEVICE_SPECS", "check_device_spec", "resolve_device", "model_device", "stats_device",
           "auto_batch_size", "pick_batch_size", "synchronize"]

DEVICE_SPECS = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# Images per forward pass: as many as keep the device busy while the activations of a 224-px ResNet-50
# stay a few GB. The budget is in input values (C*H*W per image): on the CPU 512 images of 3x48x48, i.e.
# 512 small (32-px) images, 23 at 224 px; a GPU takes 8 times more, capped at 1024 images.
_VALUES_PER_BATCH = {"cpu": 512 * 3 * 48 * 48, "mps": 2 * 512 * 3 * 48 * 48, "cuda": 8 * 512 * 3 * 48 * 48}
_MAX_BATCH = {"cpu": 512, "mps": 512, "cuda": 1024}
_MIN_BATCH = 2  # a pair: one clean image and its triggered twin


def check_device_spec(spec: str) -> str:
    """``spec`` lower-cased when it is a device spec agme knows; a DeviceError otherwise (nothing is probed)."""
    text = str(spec).strip().lower()
    if not _SPEC.fullmatch(text):
        raise DeviceError(f"unknown device {spec!r}; use {DEVICE_SPECS}")
    return text


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` of a spec, checked to be present; ``None`` and ``"auto"``: CUDA when present, else CPU.

    Raises:
        DeviceError: an unknown spec, or CUDA/MPS (or that CUDA index) missing on this machine.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_spec("auto" if spec is None else spec)
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise DeviceError("--device mps: this machine has no MPS device (Apple silicon); use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {text}: this machine has no CUDA device (or torch was built without CUDA); "
                          "use --device cpu or auto")
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a module's parameters (else its buffers) are; the CPU for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def stats_device(device: torch.device) -> torch.device:
    """Where float64 Gram statistics and the solve live: the device itself, or the CPU where it has no float64."""
    return torch.device("cpu") if device.type == "mps" else device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (it runs asynchronously), so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auto_batch_size(device: torch.device, input_size: tuple[int, ...]) -> int:
    """Images per forward pass for inputs of ``input_size`` (C, H, W) on ``device`` (see ``_VALUES_PER_BATCH``)."""
    kind = device.type if device.type in _VALUES_PER_BATCH else "cpu"
    values = 1
    for side in input_size:
        values *= int(side)
    return max(_MIN_BATCH, min(_MAX_BATCH[kind], _VALUES_PER_BATCH[kind] // max(values, 1)))


def pick_batch_size(batch_size: int | None, device: torch.device, input_size: tuple[int, ...]) -> int:
    """``batch_size`` when given (checked), else :func:`auto_batch_size`."""
    if batch_size is None:
        return auto_batch_size(device, input_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < _MIN_BATCH:
        raise UsageError(f"--batch-size must be a whole number >= {_MIN_BATCH}, got {batch_size!r}")
    return batch_size
