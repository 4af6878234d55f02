"""FP: fine-pruning (Liu et al., RAID 2018).

1. Capture the last convolutional feature map (the output of ``forward_features``, e.g. ``layer4`` of
   a ResNet) on the clean images and rank its channels by mean activation.
2. Prune the most dormant channels, 1 % of them at a time, and stop before the clean accuracy on the
   clean images drops by more than ``max_acc_drop`` (BackdoorBench's ``acc_ratio 0.1``,
   ``once_prune_ratio 0.01``). No test ASR is looked at.
3. Fine-tune, keeping the pruned channels at zero.

Pruning is written into the weights (the pruned input columns of the first linear map of the head
are zeroed), so the defended model has the same parameter names. That is exact only when the head
pools and then applies a linear map channel by channel, which is checked numerically; heads that
normalise across channels first (ConvNeXt's LayerNorm) are reported as not applicable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import UsageError
from ._common import Outcome, forward_features, forward_head, get_classifier, register_baseline
from ._train import FinetuneConfig, finetune

__all__ = ["FPConfig", "fine_prune", "head_consumer"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FPConfig(FinetuneConfig):
    """Pruning search plus the shared fine-tuning loop."""

    max_acc_drop: float = 0.10  # absolute, accuracy on the clean images before pruning minus after
    prune_step: float = 0.01  # fraction of channels added per search step
    max_ratio: float = 0.95  # never prune more than this fraction (TrojanZoo's default prune_ratio)

    SOURCES: ClassVar[dict[str, str]] = {
        **FinetuneConfig.SOURCES,
        "max_acc_drop": "fixed default: BackdoorBench fp acc_ratio 0.1; the ratio itself is chosen on the clean images",
        "prune_step": "fixed default: BackdoorBench fp once_prune_ratio 0.01",
        "max_ratio": "fixed default: TrojanZoo fine-pruning prune_ratio 0.95",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.prune_step <= 1 or not 0 <= self.max_ratio < 1 or self.max_acc_drop < 0:
            raise UsageError("need 0 < prune_step <= 1, 0 <= max_ratio < 1 and max_acc_drop >= 0.")


def head_consumer(model: nn.Module, channels: int) -> tuple[str, nn.Linear | nn.Conv2d] | None:
    """The first linear map of the head that reads the ``channels`` pooled features, with its name.

    The classifier when it reads them directly (ResNet, EfficientNet, VGG-style heads), otherwise a
    1x1 ``conv_head`` applied after pooling (MobileNetV3).
    """
    named = dict(model.named_modules())
    head = get_classifier(model)
    candidates: list[nn.Module | None] = [head, getattr(model, "conv_head", None)]
    for module in candidates:
        if isinstance(module, nn.Linear) and module.in_features == channels:
            return next(n for n, m in named.items() if m is module), module
        if isinstance(module, nn.Conv2d) and module.in_channels == channels and module.kernel_size == (1, 1):
            return next(n for n, m in named.items() if m is module), module
    return None


def _zero_columns(layer: nn.Linear | nn.Conv2d, index: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight[:, index] = 0.0


@torch.no_grad()
def _head_logits(model: nn.Module, feats: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    masked = feats if keep is None else feats * keep.view(1, -1, 1, 1).to(feats.dtype)
    return torch.cat([forward_head(model, masked[i:i + 256]) for i in range(0, len(masked), 256)])


def _exactness_check(
    model: nn.Module, feats: torch.Tensor, layer: nn.Linear | nn.Conv2d, generator: torch.Generator
) -> bool:
    """True when zeroing ``layer``'s input columns equals zeroing the feature channels before the head."""
    c = feats.shape[1]
    drop = torch.randperm(c, generator=generator)[: c // 2].to(feats.device)
    keep = torch.ones(c, dtype=torch.bool, device=feats.device)
    keep[drop] = False
    sample = feats[:8]
    via_mask = _head_logits(model, sample, keep)
    saved = layer.weight.detach().clone()
    _zero_columns(layer, drop)
    via_weights = _head_logits(model, sample)
    with torch.no_grad():
        layer.weight.copy_(saved)
    scale = via_mask.abs().max().clamp_min(1.0)
    return bool(torch.allclose(via_mask, via_weights, rtol=1e-4, atol=1e-4 * float(scale)))


def _choose_pruning(
    model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, cfg: FPConfig
) -> tuple[int, float, float, list[tuple[float, float]]]:
    """Largest prune count whose clean accuracy stays within ``max_acc_drop``; also the accuracy curve."""
    c = feats.shape[1]
    base = float((_head_logits(model, feats).argmax(1) == labels).float().mean())
    chosen, chosen_acc, curve = 0, base, [(0.0, base)]
    step = 1
    while True:
        ratio = min(step * cfg.prune_step, cfg.max_ratio)
        k = int(round(ratio * c))
        if k > chosen:
            keep = torch.ones(c, dtype=torch.bool, device=feats.device)
            keep[order[:k]] = False
            acc = float((_head_logits(model, feats, keep).argmax(1) == labels).float().mean())
            curve.append((ratio, acc))
            if base - acc > cfg.max_acc_drop:
                break
            chosen, chosen_acc = k, acc
        if ratio >= cfg.max_ratio:
            break
        step += 1
    return chosen, base, chosen_acc, curve


@register_baseline("fp", config=FPConfig)
def fine_prune(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: FPConfig, *, generator: torch.Generator
) -> Outcome:
    """Prune dormant channels of the last convolutional feature map, then fine-tune.

    Args:
        model: the copy to defend, changed in place.
        images: the clean-image budget (activations, the accuracy criterion and fine-tuning).
        labels: its true labels.
        config: pruning search and fine-tuning hyperparameters.
        generator: seeds the exactness check, batch order and augmentation.
    """
    if not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        return Outcome.not_applicable("FP needs a timm model with forward_features/forward_head.")
    with torch.no_grad():
        feats = torch.cat([forward_features(model, images[i:i + 256]) for i in range(0, len(images), 256)])
    num_features = getattr(model, "num_features", None)
    if feats.ndim != 4 or (num_features is not None and feats.shape[1] != num_features):
        return Outcome.not_applicable(
            f"FP prunes channels of a convolutional feature map (N, C, H, W); this model's features have shape "
            f"{tuple(feats.shape)} (no convolutional last stage, e.g. a ViT's tokens).",
        )
    c = feats.shape[1]
    found = head_consumer(model, c)
    if found is None or not _exactness_check(model, feats, found[1], generator):
        return Outcome.not_applicable(
            "FP's pruning cannot be written into the weights: the head mixes channels (e.g. LayerNorm) before "
            "its first linear map, so zeroing that map's inputs is not the same as pruning the feature channels.",
        )
    layer_name, layer = found
    # Liu et al. rank by mean activation: channels the clean data leaves dormant go first.
    activation = feats.mean(dim=(0, 2, 3))
    order = torch.argsort(activation)
    k, base_acc, pruned_acc, curve = _choose_pruning(model, feats, labels, order, config)
    pruned = order[:k]
    _zero_columns(layer, pruned)
    _logger.info("FP pruned %d/%d channels (clean acc %.3f -> %.3f)", k, c, base_acc, pruned_acc)
    stats = finetune(
        model, images, labels, config, generator=generator,
        after_step=(lambda: _zero_columns(layer, pruned)) if k else None,
    )
    return Outcome(
        model=model,
        chosen={
            "feature_channels": c, "pruned_channels": k, "pruned_channel_indices": sorted(pruned.tolist()),
            "prune_ratio": k / c, "masked_layer": layer_name,
            "clean_acc_before_prune": base_acc, "clean_acc_after_prune": pruned_acc,
            "prune_curve": [(round(r, 4), round(a, 4)) for r, a in curve],
            "prune_ratio_chosen_by": "largest ratio keeping clean-image accuracy within max_acc_drop",
            **stats.as_dict(),
        },
    )
