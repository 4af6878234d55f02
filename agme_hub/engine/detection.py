"""Target detection that scales with the number of classes: one joint screening, then a few full inversions.

Neural Cleanse inverts a trigger for every class, one after the other: K classes cost K inversions. Here
all classes are optimised together instead (a mask + pattern per class, in the same forward batches): each
step takes a batch of image slots, split over a chunk of the classes, and sums their losses, so one
backward pass updates every class in the chunk. Each class gets the same number of updates on the same
number of images (Adam per class, counted per class), so their mask sizes are comparable; the screening's
budget in image passes is ``screen_share`` of one single-class inversion, split evenly over the classes
(with a floor per class, so that very many classes cost more, linearly).

The screening's mask norms give the anomaly index of every class (:func:`outlier_scores`) and the ranking
(smallest first), measured at equal budget for all of them. Only the ``top_k`` leading classes then get a full inversion
(:func:`~.inversion.invert_trigger`): the leader among them (the smallest mask that reaches the target) is
the detected target and its surrogate is the one an edit uses. The anomaly index stays the screening's:
a full inversion's mask is not comparable to the screening's shorter ones.

A second statistic sees triggers that are not patch-shaped (blend, additive, sinusoidal signal): for every class,
how small a full-image perturbation ``clip(x + delta)``, ``|delta|_inf <= eps``, reaches it
(:func:`screen_full`: the per-class budget ``eps`` follows the perturbation's success, up while under half the
images reach the class, down above, so it settles where about half of them do). Its anomaly index is the
second evidence; a backdoor is suspected when either index is above a threshold that a clean model's largest
index passes with probability ``NULL_ALPHA`` only (:func:`null_threshold`: per-class log sizes i.i.d. normal,
the two statistics independent; the threshold depends on the number of classes).

The anomaly index is Grubbs' statistic of the log sizes: how many standard deviations a class's log size lies
below the mean of all classes' (the most powerful test for one low outlier among normal values). Sizes are
positive and right-skewed (some classes are far harder to reach than others), which inflates the median
absolute deviation of Neural Cleanse's index: on the development models a real backdoor's MAD index (1.5-2.0)
did not separate from a clean model's (1.2-1.8), while their logs did.

Cost, in image passes (forward + backward), against one inversion (``steps * batch_size``):
``screen_share + top_k`` for up to ``(1 - FULL_SHARE) * screen_share * steps * batch_size / (min_updates *
min_images)`` classes (the full-image screening takes ``FULL_SHARE`` of the screening's budget, for the
classes the mask screening ranks first). Above that, an untargeted prescreen (:func:`prescreen`, half an
inversion, taken out of the same budget) picks the classes the screenings measure: still ``screen_share + top_k``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import DEFAULT_INVERSION_STEPS
from ..data import ImageSet, Preprocessor
from ..devices import model_device
from ..errors import DataError
from ..progress import StageCounter
from ..surrogate_triggers import DeltaTrigger
from .inversion import FullImageEvidence, TargetDetection, anomaly_indices, frozen, invert_trigger

__all__ = ["Screening", "FullScreening", "screen_classes", "screen_full", "prescreen", "detect_target_fast",
           "null_threshold", "outlier_scores", "ANOMALY_THRESHOLD", "SUCCESS_THRESHOLD", "NULL_ALPHA", "FULL_SHARE"]

ANOMALY_THRESHOLD = 2.0  # MAD anomaly index above which a class is an outlier (Neural Cleanse's choice; patch only)
SUCCESS_THRESHOLD = 0.5  # a surrogate that sends fewer images to its class is no evidence of a shortcut
_BATCH = 64  # image slots per step of the screening (as one inversion's batch)
_LR = 0.1
_BETA = 0.2
_MIN_UPDATES, _MIN_IMAGES = 24, 1  # the screening's floor per class: fewer updates find no mask worth ranking
_FLOOR_PASSES = _MIN_UPDATES * _MIN_IMAGES
# A clean model's largest anomaly index (of either statistic) passes the threshold with this probability under
# the null (:func:`null_threshold`).
NULL_ALPHA = 0.05
FULL_SHARE = 0.25  # of the screening's image passes: the full-image screening's (the mask screening has the rest)
_FULL_IMAGES = 2  # images per update and class: many small updates let the budget settle
_FULL_MIN_UPDATES = 48  # the full-image screening's floor per class
_EPS_START = 8 / 255  # every class starts from this L-inf budget (of 1)
_EPS_TRAVEL = 6.0  # log-budget a class can move over all its updates (a factor e^6 = 400 either way)
_EPS_RANGE = (1 / 255, 1.0)
_SUCCESS_EMA = 0.8  # smoothing of the per-update success the budget follows
_SUCCESS_IMAGES = 512  # at most this many images of D minus the leader measure its perturbation's success


@dataclass(frozen=True)
class Screening:
    """Mask norms of every class after the joint screening, and what it cost."""

    classes: list[int]
    norms: np.ndarray  # mask L1 (sum over pixels) per class, in the order of ``classes``
    updates: int  # Adam updates each class got
    images: int  # images per update and class
    image_passes: int  # forward + backward image passes in all
    seconds: float


@dataclass(frozen=True)
class FullScreening:
    """Per class, the L-inf budget at which a full-image perturbation reaches it, and what it cost."""

    classes: list[int]
    eps: np.ndarray  # per class, in the order of ``classes``: the budget (of 1), geometric mean of the last half
    directions: torch.Tensor  # (classes, c, h, w) in [-1, 1], on the CPU: the perturbation is ``eps * direction``
    updates: int
    images: int
    image_passes: int
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


class _Scored(NamedTuple):
    logits: torch.Tensor  # (rows * images, classes)
    wanted: torch.Tensor  # the class each image is pushed toward: its row's
    keep: torch.Tensor  # 1 for the images that count (of another class than their row's), else 0
    ce: torch.Tensor  # per row: the mean cross-entropy toward its class over the images that count


def _class_chunks(k: int, chunk: int, n: int, images: int, generator: torch.Generator,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One update of a joint screening: all ``k`` classes in a random order, ``chunk`` per step, each with
    ``images`` random indices into D. Draws come from the CPU ``generator``: the same on every device."""
    order = torch.randperm(k, generator=generator)
    for first in range(0, k, chunk):
        rows = order[first:first + chunk].to(device)
        yield rows, torch.randint(0, n, (len(rows), images), generator=generator).to(device)


def _toward_classes(model: torch.nn.Module, preprocess: Preprocessor, stamped: torch.Tensor, classes: torch.Tensor,
                    labels: torch.Tensor) -> _Scored:
    """Run the stamped images ``(rows, images, c, h, w)`` and score each row toward its class ``classes[row]``.

    Images of the class itself (``labels``, ``(rows, images)``) say nothing about a shortcut to it: they are
    left out of its loss (and of its success, for the caller).
    """
    rows, images = stamped.shape[:2]
    logits = model(preprocess.from_unit(stamped.flatten(0, 1)))
    wanted = classes.repeat_interleave(images)
    keep = (labels.flatten() != wanted).float()
    ce = (F.cross_entropy(logits, wanted, reduction="none") * keep).view(rows, images).sum(1)
    return _Scored(logits, wanted, keep, ce / keep.view(rows, images).sum(1).clamp(min=1))


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
            for rows, idx in _class_chunks(k, chunk, n, images, generator, device):
                m_logit = mask_logit[rows].detach().requires_grad_(True)
                p_logit = pattern_logit[rows].detach().requires_grad_(True)
                mask, pattern = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
                stamped = (1 - mask[:, None]) * x[idx] + mask[:, None] * pattern[:, None]  # (rows, images, c, h, w)
                ce = _toward_classes(model, preprocess, stamped, targets[rows], labels[idx]).ce
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


def screen_full(model: torch.nn.Module, data: ImageSet, classes: list[int], *, budget: int, seed: int = 0,
                min_updates: int = _FULL_MIN_UPDATES, images: int = _FULL_IMAGES, lr: float = _LR) -> FullScreening:
    """For every class in ``classes`` jointly: the smallest L-inf budget at which a perturbation reaches it.

    Each class has a perturbation ``eps * tanh(P)`` (Adam on ``P``, cross-entropy toward the class on the other
    classes' images) and its own budget ``eps``, which after every update moves up (while the smoothed share
    of its images that reach the class is under one half) or down (above), by ``_EPS_TRAVEL / updates`` in log.
    The budget a class settles at (geometric mean over the second half of its updates) is its statistic:
    small for a class the model has a shortcut to. ``budget`` image passes in all, split evenly.
    """
    start = time.perf_counter()
    preprocess = Preprocessor.from_model(model)
    device = model_device(model)
    x = Preprocessor.to_unit(data.images).to(device)
    labels = torch.as_tensor(data.labels, dtype=torch.long, device=device)
    n, c, h, w = x.shape
    k = len(classes)
    updates = max(min_updates, budget // (k * images))
    step = _EPS_TRAVEL / updates
    chunk = max(1, _BATCH // images)  # classes per step
    generator = torch.Generator().manual_seed(seed + 15485863)
    logit = (0.1 * torch.randn(k, c, h, w, generator=generator)).to(device)
    state = {"m": torch.zeros_like(logit), "v": torch.zeros_like(logit), "step": torch.zeros(k, device=device)}
    log_eps = torch.full((k,), math.log(_EPS_START), device=device)
    settled = torch.zeros(k, device=device)  # sum of log eps over the second half of the updates
    reached = torch.zeros(k, device=device)
    targets = torch.as_tensor(classes, dtype=torch.long, device=device)
    low, high = math.log(_EPS_RANGE[0]), math.log(_EPS_RANGE[1])
    passes = 0
    with frozen(model):  # gradients reach the perturbations only
        for update in range(updates):
            for rows, idx in _class_chunks(k, chunk, n, images, generator, device):
                p_logit = logit[rows].detach().requires_grad_(True)
                delta = log_eps[rows].exp().view(-1, 1, 1, 1) * torch.tanh(p_logit)
                stamped = (x[idx] + delta[:, None]).clamp(0.0, 1.0)  # (rows, images, c, h, w)
                scored = _toward_classes(model, preprocess, stamped, targets[rows], labels[idx])
                (grad,) = torch.autograd.grad(scored.ce.sum(), [p_logit])
                _adam_rows(logit, grad, state, rows, lr)
                keep = scored.keep.view(len(rows), images)
                count = keep.sum(1)
                with torch.no_grad():
                    hits = ((scored.logits.argmax(1) == scored.wanted).view(len(rows), images).float() * keep).sum(1)
                    seen = count > 0  # a batch of the class's own images only: no news about its budget
                    share = torch.where(seen, hits / count.clamp(min=1), reached[rows])
                    reached[rows] = _SUCCESS_EMA * reached[rows] + (1 - _SUCCESS_EMA) * share
                    move = torch.where(reached[rows] < 0.5, step, -step) * seen.float()
                    log_eps[rows] = (log_eps[rows] + move).clamp(low, high)
                passes += len(rows) * images
            if update >= updates // 2:
                settled += log_eps
    eps = (settled / (updates - updates // 2)).exp().cpu().numpy().astype(np.float64)
    return FullScreening(list(classes), eps, torch.tanh(logit).detach().cpu(), updates, images, passes,
                         time.perf_counter() - start)


def outlier_scores(sizes: np.ndarray) -> np.ndarray:
    """Per class: how many standard deviations its log size lies below the mean log size (0 above the mean).

    The smallest size's score is Grubbs' statistic of the logs. Fewer than three values carry no evidence: 0.
    """
    logs = np.log(np.maximum(np.asarray(sizes, dtype=np.float64), 1e-12))
    if len(logs) < 3:
        return np.zeros(len(logs))
    score = (logs.mean() - logs) / max(float(logs.std(ddof=1)), 1e-12)
    return np.maximum(score, 0.0)


@lru_cache(maxsize=64)
def null_threshold(sizes: tuple[int, ...], alpha: float = NULL_ALPHA, draws: int = 20000, seed: int = 0) -> float:
    """The anomaly index a clean model's largest index exceeds with probability ``alpha``, by simulation.

    The null: each statistic's per-class log sizes are i.i.d. normal (``sizes``: the number of classes each
    statistic ranks) and the statistics are independent; the largest index (:func:`outlier_scores`) over the
    statistics is the one the verdict compares. Correlated statistics (a class easy to reach is easy for both)
    make the real false-positive rate lower, not higher. Deterministic (seeded), cached per ``sizes``.
    """
    rng = np.random.default_rng(seed)
    largest = np.zeros(draws)
    for k in sizes:
        if k < 3:  # no evidence either way (outlier_scores)
            continue
        for first in range(0, draws, 2000):  # chunked: 1000 classes x 20000 draws would be 160 MB at once
            z = rng.standard_normal((min(2000, draws - first), k))
            grubbs = (z.mean(axis=1) - z.min(axis=1)) / z.std(axis=1, ddof=1)
            largest[first:first + len(z)] = np.maximum(largest[first:first + len(z)], grubbs)
    return float(np.quantile(largest, 1 - alpha))


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


def _full_evidence(model: torch.nn.Module, data: ImageSet, full: FullScreening, threshold: float,
                   eval_batch_size: int) -> FullImageEvidence:
    """The full-image screening's ranking, and its leader's perturbation measured on D minus the leader."""
    index = outlier_scores(full.eps)
    order = np.argsort(full.eps, kind="stable")
    best = int(order[0])
    leader = full.classes[best]
    preprocess = Preprocessor.from_model(model)
    keep = np.flatnonzero(data.labels != leader)
    if len(keep) > _SUCCESS_IMAGES:  # many classes: a seeded sample measures the success as well
        keep = np.sort(np.random.default_rng(leader).choice(keep, _SUCCESS_IMAGES, replace=False))
    # rounded to whole pixel values, as the trigger will stamp it, before measuring its success
    delta = torch.round(255.0 * float(full.eps[best]) * full.directions[best:best + 1]) / 255.0
    success = 0.0
    if len(keep):
        x = Preprocessor.to_unit(data.images[keep])
        device = model_device(model)
        with torch.no_grad():
            preds = torch.cat([model(preprocess.from_unit((x[i:i + eval_batch_size] + delta).clamp(0.0, 1.0)
                                                         .to(device))).argmax(1).cpu()
                               for i in range(0, len(x), eval_batch_size)])
        success = float((preds == leader).float().mean())
    trigger = DeltaTrigger(delta_array=(delta[0].permute(1, 2, 0).numpy() * 255.0).astype(np.float32))
    ranking = [(full.classes[i], float(full.eps[i]), float(index[i])) for i in order]
    return FullImageEvidence(ranking=ranking, leader=leader, anomaly_index=float(index[best]),
                             eps=float(full.eps[best]), success=success,
                             flagged=bool(index[best] > threshold), trigger=trigger)


def detect_target_fast(model: torch.nn.Module, data: ImageSet, *, steps: int = DEFAULT_INVERSION_STEPS, seed: int = 0,
                       classes: list[int] | None = None, top_k: int = 2, screen_share: float = 1.0,
                       batch_size: int = 64, eval_batch_size: int = 256, full_image: bool = True,
                       progress: StageCounter | None = None) -> TargetDetection:
    """Rank all classes by one joint screening, then invert the ``top_k`` leaders fully; pick the smallest.

    With ``full_image``, ``FULL_SHARE`` of the screening's budget measures how small a full-image perturbation
    reaches each class (for as many classes as its floor allows, those the mask screening ranks first), and a
    backdoor is suspected when either statistic's leader is an outlier (:func:`outlier_scores` against
    :func:`null_threshold`). Without it, the patch evidence alone: Neural Cleanse's MAD index against
    ``ANOMALY_THRESHOLD``, as before issue 12. The detected target is the patch leader unless
    only the full-image evidence is an outlier.

    Costs about ``screen_share + top_k`` single-class inversions whatever the number of classes (up to the
    screening's floor per class, see the module's docstring).
    """
    candidates = classes if classes is not None else list(range(data.num_classes))
    if len(candidates) < 2:
        raise DataError("target detection needs at least two candidate classes")
    if len(np.unique(data.labels)) < 2:
        raise DataError("target detection needs clean images of at least two classes")
    budget = int(math.ceil(screen_share * steps * batch_size))
    share = FULL_SHARE if full_image else 0.0

    def mask_budget(total: int) -> int:  # the mask screening's part; the full-image screening has the rest
        return total - int(math.ceil(share * total))

    screened = candidates
    prescreen_steps = max(1, steps // 2)
    too_many = len(candidates) > mask_budget(budget) // _FLOOR_PASSES
    if too_many:  # the prescreen's passes come out of the screening's budget: many classes cost no more than a few
        budget = max(budget - prescreen_steps * batch_size, 2 * _FLOOR_PASSES)
    full_budget = budget - mask_budget(budget)
    budget -= full_budget
    if too_many:  # screen the classes an untargeted trigger reaches most, as many as the floor per class allows
        most = budget // _FLOOR_PASSES
        if most > _BATCH:  # one image per class and update here: whole steps only, as in the full-image screening
            most -= most % _BATCH
        screened = prescreen(model, data, candidates, keep=max(2, most), steps=prescreen_steps, seed=seed,
                             batch_size=batch_size)
    screening = screen_classes(model, data, screened, budget=budget, seed=seed, progress=progress)
    full_size = float(data.images[0, ..., 0].size)
    # classes left out by the prescreen count as full size (as a failed inversion does), index 0
    norms = np.full(len(candidates), full_size)
    index = np.zeros(len(candidates))
    at = np.array([candidates.index(cls) for cls in screened])
    norms[at] = screening.norms
    index[at] = outlier_scores(screening.norms) if full_image else anomaly_indices(screening.norms)
    order = np.argsort(norms, kind="stable")
    full = None
    threshold = ANOMALY_THRESHOLD
    if full_image:
        # the classes the mask screening ranks first, as many as the full-image screening's floor allows
        most_full = full_budget // (_FULL_MIN_UPDATES * _FULL_IMAGES)
        per_step = _BATCH // _FULL_IMAGES
        if most_full > per_step:  # whole steps only: a last step of one class would cost as many steps again
            most_full -= most_full % per_step
        shown = [candidates[i] for i in order[:max(2, most_full)]]
        shown = [cls for cls in shown if cls in set(screened)] or shown
        threshold = null_threshold((len(screened), len(shown)))
        full = _full_evidence(model, data, screen_full(model, data, shown, budget=full_budget, seed=seed),
                              threshold, eval_batch_size)
    leaders = [candidates[i] for i in order[:min(top_k, len(candidates))]]
    inversions = {t: invert_trigger(model, data, t, steps=steps, seed=seed, batch_size=batch_size,
                                    eval_batch_size=eval_batch_size, progress=progress) for t in leaders}
    # among the leaders: the smallest full mask that reaches its target (a failed one counts as full size)
    sizes = {t: (inv.mask_l1 if inv.success >= SUCCESS_THRESHOLD else full_size) for t, inv in inversions.items()}
    best = min(leaders, key=lambda t: (sizes[t], leaders.index(t)))
    position = {cls: i for i, cls in enumerate(candidates)}
    ranking = [(candidates[i], float(norms[i]), float(index[i])) for i in order]
    best_index = float(index[position[best]])
    patch_flagged = bool(best_index > threshold and inversions[best].success >= SUCCESS_THRESHOLD)
    target = best
    if full is not None and full.flagged and not patch_flagged:  # only the full-image evidence points somewhere
        target = full.leader
    flagged = patch_flagged or bool(full is not None and full.flagged)
    return TargetDetection(target, float(index[position[target]]), flagged, ranking, inversions,
                           threshold=threshold, patch_flagged=patch_flagged, full=full)
