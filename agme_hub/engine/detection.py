"""Target detection that scales with the number of classes: one joint screening, then a few full inversions.

Neural Cleanse inverts a trigger for every class, one after the other: K classes cost K inversions. Here
all classes are optimised together instead (a mask + pattern per class, in the same forward batches): each
step takes a batch of image slots, split over a chunk of the classes, and sums their losses, so one
backward pass updates every class in the chunk. Each class gets the same number of updates on the same
number of images (Adam per class, counted per class), so their mask sizes are comparable; the screening's
budget in image passes is ``screen_share`` of one single-class inversion, split evenly over the classes
(with a floor per class, so that very many classes cost more, linearly).

The screening's mask norms give the MAD anomaly index of every class and the ranking (smallest first),
measured at equal budget for all of them. Only the ``top_k`` leading classes then get a full inversion
(:func:`~.inversion.invert_trigger`): the leader among them (the smallest mask that reaches the target) is
the detected target and its surrogate is the one an edit uses. The anomaly index stays the screening's:
a full inversion's mask is not comparable to the screening's shorter ones.

Cost, in image passes (forward + backward), against one inversion (``steps * batch_size``):
``screen_share + top_k`` for up to ``screen_share * steps * batch_size / (min_updates * min_images)``
classes; above that the screening grows linearly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import DEFAULT_INVERSION_STEPS
from ..data import ImageSet, Preprocessor
from ..devices import model_device
from ..errors import DataError
from ..progress import StageCounter
from .inversion import TargetDetection, anomaly_indices, frozen, invert_trigger

__all__ = ["Screening", "screen_classes", "prescreen", "detect_target_fast", "ANOMALY_THRESHOLD", "SUCCESS_THRESHOLD"]

ANOMALY_THRESHOLD = 2.0  # MAD anomaly index above which a class is an outlier (Neural Cleanse's choice)
SUCCESS_THRESHOLD = 0.5  # a surrogate that sends fewer images to its class is no evidence of a shortcut
_BATCH = 64  # image slots per step of the screening (as one inversion's batch)
_LR = 0.1
_BETA = 0.2
_MIN_UPDATES, _MIN_IMAGES = 24, 1  # the screening's floor per class: fewer updates find no mask worth ranking
_FLOOR_PASSES = _MIN_UPDATES * _MIN_IMAGES


@dataclass(frozen=True)
class Screening:
    """Mask norms of every class after the joint screening, and what it cost."""

    classes: list[int]
    norms: np.ndarray  # mask L1 (sum over pixels) per class, in the order of ``classes``
    updates: int  # Adam updates each class got
    images: int  # images per update and class
    image_passes: int  # forward + backward image passes in all
    seconds: float


def _adam_rows(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], rows: torch.Tensor,
               lr: float, betas: tuple[float, float] = (0.5, 0.9), eps: float = 1e-8) -> None:
    """Adam on the rows ``rows`` of ``param`` (``grad`` holds their gradients), each row with its own step count:
    the same updates as one Adam per class (the betas of :func:`~.inversion.invert_trigger`)."""
    b1, b2 = betas
    state["step"][rows] += 1
    t = state["step"][rows].view(-1, *([1] * (param.dim() - 1)))
    m = state["m"][rows].mul_(b1).add_(grad, alpha=1 - b1)
    v = state["v"][rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    state["m"][rows], state["v"][rows] = m, v
    param[rows] -= lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)


def screen_classes(model: torch.nn.Module, data: ImageSet, classes: list[int], *, budget: int,
                   updates: int = DEFAULT_INVERSION_STEPS,
                   min_updates: int = _MIN_UPDATES, min_images: int = _MIN_IMAGES, seed: int = 0,
                   progress: StageCounter | None = None) -> Screening:
    """Optimise a mask + pattern for every class in ``classes`` jointly, ``budget`` image passes in all.

    Runs on the model's device; random draws come from a CPU generator (the same draws on every device).
    """
    start = time.perf_counter()
    preprocess = Preprocessor.from_model(model)
    device = model_device(model)
    x = Preprocessor.to_unit(data.images).to(device)
    labels = torch.as_tensor(data.labels, dtype=torch.long, device=device)
    n, c, h, w = x.shape
    k = len(classes)
    per_class = max(budget // k, min_updates * min_images)
    # Adam needs updates more than images per update (a mask found in 50 updates is still growing, whatever
    # their batch): ``updates`` of them when the budget allows, each on ``per_class / updates`` images (at
    # least ``min_images``); a small budget per class keeps ``min_updates``.
    images = int(np.clip(per_class // updates, min_images, _BATCH))
    updates = max(min_updates, per_class // images)
    chunk = max(1, _BATCH // images)  # classes per step
    generator = torch.Generator().manual_seed(seed)
    mask_logit = torch.full((k, 1, h, w), -3.0).add_(0.1 * torch.randn(k, 1, h, w, generator=generator)).to(device)
    pattern_logit = torch.randn(k, c, h, w, generator=generator).to(device)
    states = [{"m": torch.zeros_like(p), "v": torch.zeros_like(p), "step": torch.zeros(k, device=device)}
              for p in (mask_logit, pattern_logit)]
    targets = torch.as_tensor(classes, dtype=torch.long, device=device)
    passes = 0
    with frozen(model):  # gradients reach the trigger only
        for _ in range(updates):
            order = torch.randperm(k, generator=generator)
            for first in range(0, k, chunk):
                rows = order[first:first + chunk].to(device)
                idx = torch.randint(0, n, (len(rows), images), generator=generator).to(device)
                m_logit = mask_logit[rows].detach().requires_grad_(True)
                p_logit = pattern_logit[rows].detach().requires_grad_(True)
                mask, pattern = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
                stamped = (1 - mask[:, None]) * x[idx] + mask[:, None] * pattern[:, None]  # (rows, images, c, h, w)
                logits = model(preprocess.from_unit(stamped.flatten(0, 1)))
                wanted = targets[rows].repeat_interleave(images)
                # images of the class itself say nothing about a shortcut to it: left out of its loss
                keep = (labels[idx].flatten() != wanted).float()
                ce = (F.cross_entropy(logits, wanted, reduction="none") * keep).view(len(rows), images).sum(1)
                ce = ce / keep.view(len(rows), images).sum(1).clamp(min=1)
                loss = (ce + _BETA * mask.sum(dim=(1, 2, 3)) / (h * w)).sum()  # a sum: each class its own loss
                grad_m, grad_p = torch.autograd.grad(loss, [m_logit, p_logit])
                _adam_rows(mask_logit, grad_m, states[0], rows, _LR)
                _adam_rows(pattern_logit, grad_p, states[1], rows, _LR)
                passes += len(rows) * images
            if progress is not None:
                progress.advance()
        with torch.no_grad():
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            norms = mask.sum(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)
    return Screening(list(classes), norms, updates, images, passes, time.perf_counter() - start)


def prescreen(model: torch.nn.Module, data: ImageSet, classes: list[int], *, keep: int, steps: int, seed: int = 0,
              batch_size: int = 64) -> list[int]:
    """The ``keep`` classes an untargeted universal trigger sends the most probability to, in their order.

    One small mask + pattern, optimised to push every image away from its own class (``-log(1 - p_true)``
    plus the mask penalty): a backdoor is the cheapest way out of every class at once, so its target
    draws the stamped images. Costs ``steps`` steps of one inversion, whatever the number of classes.
    """
    preprocess = Preprocessor.from_model(model)
    device = model_device(model)
    x = Preprocessor.to_unit(data.images).to(device)
    labels = torch.as_tensor(data.labels, dtype=torch.long, device=device)
    n, c, h, w = x.shape
    generator = torch.Generator().manual_seed(seed + 104729)
    mask_logit = torch.full((1, 1, h, w), -3.0).add_(0.1 * torch.randn(1, 1, h, w, generator=generator)).to(device)
    pattern_logit = torch.randn(1, c, h, w, generator=generator).to(device)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=_LR, betas=(0.5, 0.9))
    with frozen(model):  # gradients reach the trigger only
        for _ in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(device)
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            probs = model(preprocess.from_unit((1 - mask) * x[idx] + mask * pattern)).softmax(1)
            own = probs.gather(1, labels[idx, None]).squeeze(1)
            loss = -torch.log1p(-own.clamp(max=1 - 1e-6)).mean() + _BETA * mask.sum() / (h * w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            drawn = torch.zeros(0)
            for i in range(0, n, 256):
                probs = model(preprocess.from_unit((1 - mask) * x[i:i + 256] + mask * pattern)).softmax(1)
                probs = probs.scatter(1, labels[i:i + 256, None], 0.0).sum(0)  # the mass that left the own class
                drawn = probs if i == 0 else drawn + probs
            drawn = drawn.cpu()
    score = np.array([float(drawn[cls]) if cls < len(drawn) else 0.0 for cls in classes])
    return [classes[i] for i in np.argsort(-score, kind="stable")[:keep]]


def detect_target_fast(model: torch.nn.Module, data: ImageSet, *, steps: int = DEFAULT_INVERSION_STEPS, seed: int = 0,
                       classes: list[int] | None = None, top_k: int = 2, screen_share: float = 1.0,
                       batch_size: int = 64, eval_batch_size: int = 256,
                       progress: StageCounter | None = None) -> TargetDetection:
    """Rank all classes by one joint screening, then invert the ``top_k`` leaders fully; pick the smallest.

    Costs about ``screen_share + top_k`` single-class inversions whatever the number of classes (up to the
    screening's floor per class, see the module's docstring).
    """
    candidates = classes if classes is not None else list(range(data.num_classes))
    if len(candidates) < 2:
        raise DataError("target detection needs at least two candidate classes")
    if len(np.unique(data.labels)) < 2:
        raise DataError("target detection needs clean images of at least two classes")
    budget = int(math.ceil(screen_share * steps * batch_size))
    screened = candidates
    most = budget // _FLOOR_PASSES
    if len(candidates) > most:  # too many classes for the budget: screen those an untargeted trigger reaches most
        screened = prescreen(model, data, candidates, keep=most, steps=max(1, steps // 2), seed=seed,
                             batch_size=batch_size)
    screening = screen_classes(model, data, screened, budget=budget, seed=seed, progress=progress)
    full_size = float(data.images[0, ..., 0].size)
    # classes left out by the prescreen count as full size (as a failed inversion does), index 0
    norms = np.full(len(candidates), full_size)
    index = np.zeros(len(candidates))
    at = np.array([candidates.index(cls) for cls in screened])
    norms[at] = screening.norms
    index[at] = anomaly_indices(screening.norms)
    order = np.argsort(norms, kind="stable")
    leaders = [candidates[i] for i in order[:min(top_k, len(candidates))]]
    inversions = {t: invert_trigger(model, data, t, steps=steps, seed=seed, batch_size=batch_size,
                                    eval_batch_size=eval_batch_size, progress=progress) for t in leaders}
    # among the leaders: the smallest full mask that reaches its target (a failed one counts as full size)
    sizes = {t: (inv.mask_l1 if inv.success >= SUCCESS_THRESHOLD else full_size) for t, inv in inversions.items()}
    best = min(leaders, key=lambda t: (sizes[t], leaders.index(t)))
    position = {cls: i for i, cls in enumerate(candidates)}
    ranking = [(candidates[i], float(norms[i]), float(index[i])) for i in order]
    best_index = float(index[position[best]])
    flagged = bool(best_index > ANOMALY_THRESHOLD and inversions[best].success >= SUCCESS_THRESHOLD)
    return TargetDetection(best, best_index, flagged, ranking, inversions)
