"""NC: Neural Cleanse (Wang et al., S&P 2019) detection, then unlearning with the recovered trigger.

1. For each candidate target class t, reverse-engineer the smallest trigger that sends the clean images
   of the other classes to t: ``x' = (1 - m) * x + m * p`` in pixel space [0, 1] (normalisation undone
   and redone with the model's ``pretrained_cfg`` mean/std), ``m = sigmoid(M)`` of shape (1, 1, H, W),
   ``p = sigmoid(P)`` of shape (1, C, H, W); loss ``CE(f(x'), t) + cost * |m|_1`` with Adam (lr 0.1)
   and Neural Cleanse's adaptive cost (raised while the trigger succeeds, lowered while it fails).
2. Flag the class whose mask L1 norm is a low outlier: anomaly index ``(median - min) / (1.4826 * MAD)``,
   flagged when > 2. ``target=`` skips detection.
3. Unlearn: fine-tune on the clean images with ``stamp_fraction`` of every batch stamped with the
   recovered trigger and keeping its TRUE label (BackdoorBench's NC is this unlearning variant).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ClassMismatchError, UsageError
from ._common import Outcome, num_classes_of, pixel_stats, register_baseline
from ._train import FinetuneConfig, finetune

__all__ = ["NCConfig", "Trigger", "neural_cleanse", "invert_trigger", "anomaly_index"]

_logger = logging.getLogger(__name__)

# Neural Cleanse's cost is per pixel of a 32x32 CIFAR mask; scaling by the mask area keeps the same
# balance between the two loss terms at any input size.
_REFERENCE_AREA = 32 * 32


@dataclass(frozen=True)
class NCConfig(FinetuneConfig):
    """Trigger inversion, detection and unlearning hyperparameters."""

    target: int | None = None  # known target class: skip detection (else every class in the budget is tried)
    steps: int = 150  # Adam steps of the inversion, per candidate class
    inversion_lr: float = 0.1
    inversion_batch: int = 32
    init_cost: float = 1e-3  # Neural Cleanse's init_cost, per pixel of a 32x32 mask
    cost_multiplier: float = 1.5
    cost_patience: int = 5  # steps of success (failure) before the cost goes up (down)
    success_threshold: float = 0.99  # attack success a mask needs to count as a trigger
    anomaly_threshold: float = 2.0
    unlearn_if_clean: bool = True  # no class flagged: still unlearn the smallest-norm class's trigger
    stamp_fraction: float = 0.2
    mean: tuple[float, ...] | None = None  # input normalisation; None reads the model's pretrained_cfg
    std: tuple[float, ...] | None = None

    SOURCES: ClassVar[dict[str, str]] = {
        **FinetuneConfig.SOURCES,
        "target": "detected by the MAD anomaly index unless given",
        "steps": "fixed default: 100-200 Adam steps per class keep 10-class detection CPU-cheap",
        "inversion_lr": "fixed default: Neural Cleanse (Adam lr 0.1)",
        "inversion_batch": "fixed default",
        "init_cost": "fixed default: Neural Cleanse init_cost 1e-3",
        "cost_multiplier": "fixed default: Neural Cleanse cost_multiplier 1.5",
        "cost_patience": "fixed default: Neural Cleanse's patience, counted in steps",
        "success_threshold": "fixed default: Neural Cleanse attack_succ_threshold 0.99",
        "anomaly_threshold": "fixed default: Neural Cleanse (anomaly index > 2)",
        "unlearn_if_clean": "fixed default: the benchmark defends models known to be backdoored",
        "stamp_fraction": "fixed default: Neural Cleanse unlearning (20 % of the data stamped)",
        "mean": "the model's pretrained_cfg",
        "std": "the model's pretrained_cfg",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.inversion_batch < 1 or not 0 <= self.stamp_fraction <= 1:
            raise UsageError("need steps >= 1, inversion_batch >= 1 and 0 <= stamp_fraction <= 1.")


@dataclass(frozen=True)
class Trigger:
    """A recovered trigger in pixel space [0, 1]: ``x' = (1 - mask) * x + mask * pattern``."""

    target: int
    mask: torch.Tensor  # (1, 1, H, W)
    pattern: torch.Tensor  # (1, C, H, W)
    l1: float  # mask L1 norm (sum over pixels)
    success: float  # fraction of the other classes' clean images sent to ``target``

    def apply(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Stamp normalised images ``x``; returns normalised images."""
        raw = x * std + mean
        return ((1 - self.mask) * raw + self.mask * self.pattern - mean) / std


def invert_trigger(
    model: nn.Module, images: torch.Tensor, target: int, cfg: NCConfig, *,
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
) -> Trigger:
    """Reverse-engineer the smallest mask/pattern sending ``images`` (none of class ``target``) to ``target``.

    Args:
        model: frozen during inversion (its weights get no gradient step).
        images: normalised clean images of the other classes.
        target: the candidate target class.
        cfg: inversion hyperparameters.
        mean: input normalisation mean, (1, C, 1, 1).
        std: input normalisation std, (1, C, 1, 1).
        generator: seeds the minibatches.

    Returns:
        The trigger with the smallest mask among those reaching ``success_threshold`` on a minibatch
        (Neural Cleanse's rule), or the last one when none did.
    """
    _, c, h, w = images.shape
    device = images.device
    mask_param = torch.zeros(1, 1, h, w, device=device, requires_grad=True)
    pattern_param = torch.zeros(1, c, h, w, device=device, requires_grad=True)
    opt = torch.optim.Adam([mask_param, pattern_param], lr=cfg.inversion_lr, betas=(0.5, 0.9))
    raw = images * std + mean
    y = torch.full((len(images),), target, dtype=torch.long, device=device)
    per_pixel = cfg.init_cost * _REFERENCE_AREA / (h * w)
    cost, up, down = per_pixel, 0, 0
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    last_success = 0.0
    for _ in range(cfg.steps):
        idx = torch.randperm(len(images), generator=generator)[: cfg.inversion_batch].to(device)
        mask, pattern = torch.sigmoid(mask_param), torch.sigmoid(pattern_param)
        stamped = ((1 - mask) * raw[idx] + mask * pattern - mean) / std
        logits = model(stamped)
        l1 = mask.sum()
        loss = F.cross_entropy(logits, y[idx]) + cost * l1
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        last_success = float((logits.argmax(1) == target).float().mean())
        l1_now = float(l1.detach())
        if last_success >= cfg.success_threshold and (best is None or l1_now < best[0]):
            best = (l1_now, mask.detach().clone(), pattern.detach().clone(), last_success)
        # Neural Cleanse's cost schedule: tighten the mask while it works, relax it while it fails.
        up, down = (up + 1, 0) if last_success >= cfg.success_threshold else (0, down + 1)
        if up >= cfg.cost_patience:
            cost, up = cost * cfg.cost_multiplier, 0
        elif down >= cfg.cost_patience:
            cost, down = cost / cfg.cost_multiplier**1.5, 0
    if best is None:
        mask, pattern = torch.sigmoid(mask_param).detach(), torch.sigmoid(pattern_param).detach()
        return Trigger(target, mask, pattern, float(mask.sum()), last_success)
    l1_best, mask, pattern, success = best
    return Trigger(target, mask, pattern, l1_best, success)


def anomaly_index(norms: dict[int, float]) -> tuple[int, float]:
    """The class with the smallest mask norm and its MAD anomaly index (consistency constant 1.4826)."""
    values = list(norms.values())
    median = statistics.median(values)
    mad = 1.4826 * statistics.median(abs(v - median) for v in values)
    low = min(norms, key=norms.__getitem__)
    index = (median - norms[low]) / mad if mad > 0 else 0.0
    return low, index


@register_baseline("nc", config=NCConfig)
def neural_cleanse(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: NCConfig, *, generator: torch.Generator
) -> Outcome:
    """Detect the target with Neural Cleanse, then unlearn its recovered trigger by fine-tuning.

    Args:
        model: the copy to defend, changed in place.
        images: the clean-image budget (inversion and unlearning).
        labels: its true labels.
        config: inversion, detection and fine-tuning hyperparameters.
        generator: seeds inversion minibatches, stamping, batch order and augmentation.

    Raises:
        ClassMismatchError: ``target`` is not a class of the model.
    """
    n_classes = num_classes_of(model)
    if config.target is not None and not 0 <= config.target < n_classes:
        raise ClassMismatchError(f"target must lie in [0, {n_classes}); got {config.target}.")
    mean, std = pixel_stats(model, images.shape[1], mean=config.mean, std=config.std)
    mean, std = mean.to(images.device), std.to(images.device)
    index: float | None
    candidates = [config.target] if config.target is not None else sorted(set(labels.tolist()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # inversion trains the trigger only
        p.requires_grad_(False)
    model.eval()
    triggers: dict[int, Trigger] = {}
    for t in candidates:
        others = images[labels != t]
        if len(others) == 0:
            continue
        triggers[t] = invert_trigger(model, others, t, config, mean=mean, std=std, generator=generator)
        _logger.debug("NC class %d: mask L1 %.1f, success %.2f", t, triggers[t].l1, triggers[t].success)
    for p in trainable:
        p.requires_grad_(True)
    if not triggers:
        return Outcome.not_applicable("NC needs clean images of at least one class other than the candidate target.")
    norms = {t: trig.l1 for t, trig in triggers.items()}
    if config.target is not None:
        target, index, flagged = config.target, None, True
    else:
        target, index = anomaly_index(norms)
        flagged = index > config.anomaly_threshold
    chosen = {
        "detected_target": target, "anomaly_index": index, "flagged": flagged,
        "mask_l1": {t: round(v, 3) for t, v in norms.items()},
        "trigger_success": round(triggers[target].success, 4),
    }
    if not flagged and not config.unlearn_if_clean:
        chosen["unlearned"] = False
        return Outcome(model=model, chosen=chosen)
    trigger = triggers[target]

    def stamp(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Stamped images keep their true labels: the model learns to ignore the trigger.
        pick = (torch.rand(len(x), generator=gen) < config.stamp_fraction).to(x.device)
        return torch.where(pick.view(-1, 1, 1, 1), trigger.apply(x, mean, std), x)

    stats = finetune(model, images, labels, config, generator=generator, stamp=stamp)
    chosen.update(unlearned=True, **stats.as_dict())
    return Outcome(model=model, chosen=chosen)
