"""FT-SAM (Zhu et al., ICCV 2023): fine-tuning with sharpness-aware minimisation.

Defaults follow BackdoorBench's ``config/defense/ft-sam``: adaptive SAM (ASAM), rho 2.0, label
smoothing 0.1, on the shared fine-tuning loop (SGD, lr 0.01, cosine). The perturbation pushes the
weights out of the sharp minimum the backdoor neurons sit in, which plain fine-tuning with few images
rarely leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import UsageError
from ._common import Outcome, register_baseline
from ._train import FinetuneConfig, finetune

__all__ = ["FTSAMConfig", "fine_tune_sam"]


@dataclass(frozen=True)
class FTSAMConfig(FinetuneConfig):
    """Fine-tuning loop plus the SAM radius."""

    rho: float = 2.0
    adaptive: bool = True
    label_smoothing: float = 0.1

    SOURCES: ClassVar[dict[str, str]] = {
        **FinetuneConfig.SOURCES,
        "rho": "fixed default: BackdoorBench ft-sam (rho_max = rho_min = 2.0, with adaptive SAM)",
        "adaptive": "fixed default: BackdoorBench ft-sam (--adaptive defaults to True)",
        "label_smoothing": "fixed default: BackdoorBench ft-sam",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rho <= 0:
            raise UsageError(f"rho must be > 0, got {self.rho}.")


@register_baseline("ftsam", config=FTSAMConfig)
def fine_tune_sam(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: FTSAMConfig, *,
    generator: torch.Generator,
) -> Outcome:
    """Fine-tune every weight with (adaptive) sharpness-aware minimisation.

    Args:
        model: the copy to defend, changed in place.
        images: the clean-image budget.
        labels: its true labels.
        config: the loop's hyperparameters and ``rho``.
        generator: seeds batch order and augmentation.
    """
    stats = finetune(model, images, labels, config, generator=generator, sam=(config.rho, config.adaptive))
    return Outcome(model=model, chosen=stats.as_dict())
