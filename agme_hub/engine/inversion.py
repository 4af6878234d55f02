"""Without backdoor knowledge: reconstruct a surrogate trigger, and find the target class.

Trigger inversion in the style of Neural Cleanse, on the raw pixels of the clean images:
``x' = (1 - m) x + m p`` with ``m = sigmoid(M)`` (one channel) and ``p = sigmoid(P)``, minimising
``CE(f(x'), t) + beta * mean(m)`` over D minus class t (``mean(m) = |m|_1 / (h w)``, the fraction of the
image the mask covers; ``beta = 0.2``). The surrogate need not match the real trigger: it only has to
push features the way the trigger does.

Detection (``engine/detection.py``) screens every class jointly, inverts only the leaders with
:func:`invert_trigger`, and scores the mask sizes as outliers; a backdoor target needs a much smaller mask
than the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import DEFAULT_INVERSION_STEPS
from ..data import ImageSet, Preprocessor
from ..devices import model_device
from ..errors import DataError
from ..progress import StageCounter
from ..surrogate_triggers import DeltaTrigger, MaskTrigger

__all__ = ["Inversion", "FullImageEvidence", "TargetDetection", "invert_trigger", "anomaly_indices", "frozen",
           "optimise", "other_class_images"]


@dataclass(frozen=True)
class Inversion:
    target: int
    trigger: MaskTrigger
    mask_l1: float  # sum of the mask over pixels
    success: float  # fraction of D minus the target sent to the target by the surrogate
    seconds: float


@dataclass(frozen=True)
class FullImageEvidence:
    """How small a full-image perturbation ``clip(x + delta)``, ``|delta|_inf <= eps``, reaches each class."""

    ranking: list[tuple[int, float, float]]  # (class, eps, anomaly index), smallest eps first
    leader: int  # the class the smallest perturbation reaches
    anomaly_index: float  # the leader's anomaly index of eps (detection.outlier_scores)
    eps: float  # the leader's budget (of 1): about half of D minus the leader reaches it at that size
    success: float  # fraction of D minus the leader its perturbation sends to it, at ``eps``
    flagged: bool  # the leader's index is above the detection's threshold
    trigger: DeltaTrigger  # the leader's perturbation


@dataclass(frozen=True)
class TargetDetection:
    target: int
    anomaly_index: float  # of the chosen class (patch: mask L1); above ``threshold`` counts as an outlier
    flagged: bool  # a backdoor is suspected: the patch or the full-image evidence is an outlier
    ranking: list[tuple[int, float, float]]  # (class, mask L1, anomaly index), smallest mask first
    inversions: dict[int, Inversion]
    threshold: float = 2.0  # the anomaly index above which a class is an outlier
    patch_flagged: bool | None = None  # the patch evidence alone (None: the same as ``flagged``)
    full: FullImageEvidence | None = None  # the full-image screening, when it ran


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with its parameters frozen, as it was afterwards: an optimised trigger gets the gradients."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def other_class_images(model: torch.nn.Module, data: ImageSet, target: int
                       ) -> tuple[Preprocessor, torch.device, torch.Tensor]:
    """What a trigger toward ``target`` is optimised on: D minus that class, in [0, 1], on the model's device."""
    keep = data.labels != target
    if not keep.any():
        raise DataError(f"trigger inversion for class {target} needs images of other classes")
    device = model_device(model)
    return Preprocessor.from_model(model), device, Preprocessor.to_unit(data.images[keep]).to(device)


def optimise(loss_of: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, *, steps: int,
             rows: int, batch_size: int, generator: torch.Generator, device: torch.device,
             progress: StageCounter | None = None) -> None:
    """``steps`` optimiser steps on ``loss_of(idx)``, each on a minibatch of ``rows`` drawn from ``generator``
    (on the CPU, so a seed gives the same draws on every device): the loop every inversion shares."""
    for _ in range(steps):
        idx = torch.randint(0, rows, (min(batch_size, rows),), generator=generator).to(device)
        loss = loss_of(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.advance()


def invert_trigger(model: torch.nn.Module, data: ImageSet, target: int, *, steps: int = DEFAULT_INVERSION_STEPS,
                   lr: float = 0.1, beta: float = 0.2, batch_size: int = 64, seed: int = 0,
                   eval_batch_size: int = 256, progress: StageCounter | None = None) -> Inversion:
    """Reconstruct a small mask + pattern that sends D minus class ``target`` to ``target``.

    ``batch_size`` is the optimisation's minibatch (part of the method); ``eval_batch_size`` only chunks the
    final forward passes. Runs on the model's device; random draws come from a CPU generator, so a seed
    gives the same draws on every device.
    """
    import time

    start = time.perf_counter()
    preprocess, device, x = other_class_images(model, data, target)
    n, c, h, w = x.shape
    generator = torch.Generator().manual_seed(seed + 7919 * target)
    mask_logit = torch.full((1, 1, h, w), -3.0).add_(0.1 * torch.randn(1, 1, h, w, generator=generator)).to(device)
    pattern_logit = torch.randn(1, c, h, w, generator=generator).to(device)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    labels = torch.full((n,), target, dtype=torch.long, device=device)
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        stamped = (1 - mask) * x[idx] + mask * pattern
        # beta * mean(m), written as the sum over h*w pixels: this order of float32 operations gives the
        # same masks, bit for bit, as the runs measured before beta absorbed a factor of 10 (0.02 * 10).
        return F.cross_entropy(model(preprocess.from_unit(stamped)), labels[idx]) + beta * mask.sum() / (h * w)

    with frozen(model):  # gradients reach the trigger only
        optimise(loss_of, optimizer, steps=steps, rows=n, batch_size=batch_size, generator=generator, device=device,
                 progress=progress)
        with torch.no_grad():
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            preds = torch.cat([model(preprocess.from_unit((1 - mask) * x[i:i + eval_batch_size] + mask * pattern)
                                     ).argmax(1) for i in range(0, n, eval_batch_size)])
            success = float((preds == target).float().mean())
    pattern_hwc = (pattern[0].permute(1, 2, 0).cpu().numpy() * 255.0).astype(np.float32)
    mask_hw1 = mask[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)
    trigger = MaskTrigger(pattern_array=pattern_hwc, mask_array=mask_hw1)
    return Inversion(target, trigger, float(mask_hw1.sum()), success, time.perf_counter() - start)


def anomaly_indices(norms: np.ndarray) -> np.ndarray:
    """MAD anomaly index of each value below the median (0 for values above it)."""
    median = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - median))
    index = (median - norms) / max(mad, 1e-12)
    return np.where(norms < median, index, 0.0)
