"""FT: fine-tune the whole model on the clean images (the NIST TrojAI and BackdoorBench baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import Outcome, register_baseline
from ._train import FinetuneConfig, finetune

__all__ = ["FTConfig", "fine_tune"]


@dataclass(frozen=True)
class FTConfig(FinetuneConfig):
    """FT has no hyperparameters beyond the shared fine-tuning loop."""


@register_baseline("ft", config=FTConfig)
def fine_tune(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: FTConfig, *, generator: torch.Generator
) -> Outcome:
    """Fine-tune every weight on the clean images with light augmentation.

    Args:
        model: the copy to defend, changed in place.
        images: the clean-image budget.
        labels: its true labels.
        config: the loop's hyperparameters.
        generator: seeds batch order and augmentation.
    """
    stats = finetune(model, images, labels, config, generator=generator)
    return Outcome(model=model, chosen=stats.as_dict())
