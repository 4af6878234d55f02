"""Forgetting metrics from batched forward passes: CA, ASR, TA, RA, per-class accuracy, DER.

One pass over the clean set gives CA, TA and per-class accuracy; one pass over its triggered copy gives
ASR and RA. ASR counts only images whose true class is not the target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import ImageSet, Preprocessor
from ..devices import model_device
from ..progress import StageCounter
from ..triggers import Trigger

__all__ = ["Metrics", "predict", "measure", "measured_images", "natural_confusion", "defense_effectiveness_rating"]


@dataclass(frozen=True)
class Metrics:
    """Fractions in [0, 1]; ``None`` where not measured (no trigger or no target)."""

    clean_accuracy: float
    attack_success_rate: float | None
    target_accuracy: float | None
    robust_accuracy: float | None
    per_class_accuracy: list[float | None]
    n_images: int
    n_triggered: int

    def as_dict(self, *, per_class: bool = False) -> dict[str, object]:
        out = asdict(self)
        if not per_class:
            out.pop("per_class_accuracy")
        return out


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, preprocess: Preprocessor, *,
            trigger: Trigger | None = None, batch_size: int = 256,
            progress: StageCounter | None = None) -> np.ndarray:
    """Predicted class of every image (stamped with ``trigger`` first, when given), on the model's device."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if trigger is not None:
            batch = trigger.apply(batch)
        out.append(model(preprocess(batch).to(device)).argmax(1).cpu().numpy())
        if progress is not None:
            progress.advance(len(batch))
    model.train(was_training)
    return np.concatenate(out) if out else np.array([], np.int64)


def measured_images(data: ImageSet, *, trigger: Trigger | None = None, target: int | None = None) -> int:
    """How many forward passes :func:`measure` makes (for progress totals)."""
    if trigger is None:
        return len(data)
    return len(data) + int((data.labels != target).sum() if target is not None else len(data))


def measure(model: torch.nn.Module, data: ImageSet, preprocess: Preprocessor, *, trigger: Trigger | None = None,
            target: int | None = None, batch_size: int = 256, progress: StageCounter | None = None) -> Metrics:
    """Measure CA, TA, per-class accuracy and, with a trigger and a target, ASR and RA."""
    labels = data.labels
    pred = predict(model, data.images, preprocess, batch_size=batch_size, progress=progress)
    correct = pred == labels
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else None for c in range(data.num_classes)]
    target_acc = per_class[target] if target is not None and target < len(per_class) else None
    asr = ra = None
    n_triggered = 0
    if trigger is not None:
        keep = labels != target if target is not None else np.ones(len(labels), bool)
        n_triggered = int(keep.sum())
        if n_triggered:
            trig_pred = predict(model, data.images[keep], preprocess, trigger=trigger, batch_size=batch_size,
                                progress=progress)
            ra = float((trig_pred == labels[keep]).mean())
            asr = float((trig_pred == target).mean()) if target is not None else None
    return Metrics(float(correct.mean()), asr, target_acc, ra, per_class, len(labels), n_triggered)


def natural_confusion(model: torch.nn.Module, data: ImageSet, preprocess: Preprocessor, target: int, *,
                      batch_size: int = 256) -> float:
    """The share of clean images of other classes that the model already sends to ``target``, with no trigger:
    the floor a cleaned model's ASR is measured against (0 when ``data`` holds the target class only)."""
    others = data.labels != target
    if not others.any():
        return 0.0
    return float((predict(model, data.images[others], preprocess, batch_size=batch_size) == target).mean())


def defense_effectiveness_rating(before: Metrics, after: Metrics) -> float | None:
    """DER as in FT-SAM (Zhu et al., ICCV 2023): ``(max(0, dASR) - max(0, dCA) + 1) / 2`` in [0, 1]."""
    if before.attack_success_rate is None or after.attack_success_rate is None:
        return None
    d_asr = before.attack_success_rate - after.attack_success_rate
    d_ca = before.clean_accuracy - after.clean_accuracy
    return (max(0.0, d_asr) - max(0.0, d_ca) + 1.0) / 2.0
