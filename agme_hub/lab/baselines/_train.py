"""The fine-tuning loop shared by FT, FP, NC-unlearning and FT-SAM, and the SAM optimizer wrapper.

Defaults follow BackdoorBench's fine-tuning recipe (SGD, lr 0.01, momentum 0.9, weight decay 5e-4,
cosine schedule) scaled down to a clean-image budget of 1-50 images per class: 20 epochs (the
fine-tuning rows of METHOD.md) at batch 32 instead of 100 epochs at batch 256 on 2,500 images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UsageError
from ._common import BaselineConfig

__all__ = ["FinetuneConfig", "FinetuneStats", "SAM", "augment", "finetune", "freeze_batchnorm_stats"]

_logger = logging.getLogger(__name__)

Stamp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class FinetuneConfig(BaselineConfig):
    """Hyperparameters of the shared fine-tuning loop."""

    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # "train" (BackdoorBench's behaviour): BatchNorm normalises with batch statistics and updates its
    # running statistics. "eval" freezes the running statistics, which sounds safer for 10-32 image
    # batches but measured worse on the test ResNet (10 images per class): at lr 0.01 nothing
    # renormalises the activations as the conv weights move, and clean accuracy fell from 99 % to
    # 16 % (one training draw diverged to NaN); at lr 0.001 the backdoor survived (ASR 50 %).
    bn_mode: str = "train"
    max_shift: float = 0.0625  # random translation, as a fraction of the image side (2 px at 32 px)
    hflip: bool = False  # off by default: flips are wrong for digits, signs and text

    SOURCES: ClassVar[dict[str, str]] = {
        "epochs": "fixed default: METHOD.md fine-tuning rows (BackdoorBench uses 100 on 2,500 images)",
        "batch_size": "fixed default: small budgets give several steps per epoch",
        "optimizer": "fixed default: BackdoorBench FT (SGD)",
        "lr": "fixed default: BackdoorBench FT (cosine-annealed per step)",
        "momentum": "fixed default: BackdoorBench FT",
        "weight_decay": "fixed default: BackdoorBench FT",
        "label_smoothing": "fixed default",
        "bn_mode": "fixed default: BackdoorBench (BatchNorm in train mode); 'eval' collapsed in tests",
        "max_shift": "fixed default: light augmentation (CIFAR-style 2 px at 32 px)",
        "hflip": "fixed default: domain-safe (no flips)",
    }

    def __post_init__(self) -> None:
        if self.optimizer not in {"sgd", "adam"}:
            raise UsageError(f"optimizer must be 'sgd' or 'adam', not {self.optimizer!r}.")
        if self.bn_mode not in {"eval", "train"}:
            raise UsageError(f"bn_mode must be 'eval' or 'train', not {self.bn_mode!r}.")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError("epochs must be >= 0, batch_size >= 1 and lr > 0.")


@dataclass(frozen=True)
class FinetuneStats:
    """What the loop reports: recorded in ``hparams`` so a diverged run is visible."""

    final_loss: float  # mean loss of the last epoch that ran
    steps: int
    diverged: bool  # a non-finite loss stopped the loop; the weights are left as they were then

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"final_train_loss": self.final_loss, "train_steps": self.steps, "diverged": self.diverged}


class SAM:
    """Sharpness-aware minimisation around any torch optimizer (Foret et al. 2021; ASAM with ``adaptive``).

    Example:
        >>> sam = SAM(torch.optim.SGD(params, lr=0.01), rho=2.0, adaptive=True)  # doctest: +SKIP
        >>> loss_fn().backward(); sam.ascend(); loss_fn().backward(); sam.descend()  # doctest: +SKIP

    ``ascend`` moves the weights to the worst point within radius ``rho`` (scaled by |w| per weight
    when ``adaptive``); ``descend`` moves them back and takes the base step with the gradient
    measured there.
    """

    def __init__(self, base: torch.optim.Optimizer, *, rho: float, adaptive: bool) -> None:
        if rho <= 0:
            raise UsageError(f"rho must be > 0, got {rho}.")
        self.base = base
        self.rho = rho
        self.adaptive = adaptive
        self._offsets: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _with_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, p.grad) for group in self.base.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def ascend(self) -> None:
        pairs = self._with_grads()
        if not pairs:
            return
        scaled = [(p.abs() * g) if self.adaptive else g for p, g in pairs]
        norm = float(torch.norm(torch.stack([s.norm(p=2) for s in scaled]), p=2))
        scale = self.rho / (norm + 1e-12)
        for p, g in pairs:
            offset = (p * p * g if self.adaptive else g) * scale
            p.add_(offset)
            self._offsets.append((p, offset))
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def descend(self) -> None:
        for p, offset in self._offsets:
            p.sub_(offset)
        self._offsets.clear()
        self.base.step()
        self.base.zero_grad(set_to_none=True)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode (running statistics used and not updated); affine weights still train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def augment(x: torch.Tensor, *, max_shift: float, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation (edge-replicated padding, then crop) and optional horizontal flip, per image.

    Works on normalised tensors: replicating the border avoids inventing a fill value.
    """
    n, _, h, w = x.shape
    pad = max(1, round(max_shift * min(h, w))) if max_shift > 0 else 0
    out = x
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1).to(out.device), out.flip(-1), out)
    return out


def _optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    generator: torch.Generator,
    stamp: Stamp | None = None,
    after_step: Callable[[], None] | None = None,
    sam: tuple[float, bool] | None = None,
) -> FinetuneStats:
    """Fine-tune ``model`` in place on the clean images.

    Args:
        model: trained in place, left in eval mode.
        images: preprocessed clean images.
        labels: their true labels (never changed, also for stamped images).
        cfg: the loop's hyperparameters.
        generator: drives batch order, augmentation and ``stamp``.
        stamp: applied to each augmented batch (NC-unlearning stamps part of it with a trigger).
        after_step: called after every optimizer step (FP re-applies its pruning mask there).
        sam: ``(rho, adaptive)`` to train with sharpness-aware minimisation.
    """
    n = len(images)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    sharp = SAM(opt, rho=sam[0], adaptive=sam[1]) if sam is not None else None

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)

    model.train()
    if cfg.bn_mode == "eval":
        freeze_batchnorm_stats(model)
    last, steps = 0.0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(images.device)
        losses = []
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if cfg.bn_mode == "train" and len(idx) < 2:
                continue  # a BatchNorm in train mode cannot normalise a batch of one
            x = augment(images[idx], max_shift=cfg.max_shift, hflip=cfg.hflip, generator=generator)
            if stamp is not None:
                x = stamp(x, generator)
            y = labels[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x, y)
            if not torch.isfinite(loss):
                _logger.warning("fine-tuning diverged at step %d (loss %s); stopping", steps, float(loss))
                model.eval()
                return FinetuneStats(final_loss=float(loss), steps=steps, diverged=True)
            torch.autograd.backward(loss)
            if sharp is None:
                opt.step()
            else:
                sharp.ascend()
                torch.autograd.backward(loss_of(x, y))
                sharp.descend()
            sched.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            steps += 1
        last = sum(losses) / max(1, len(losses))
    model.eval()
    return FinetuneStats(final_loss=last, steps=steps, diverged=False)
