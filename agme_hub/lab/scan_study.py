"""Measure target detection and ``agme scan`` on real trained models: accuracy, TPR/FPR and cost.

Models are trained once and cached (``cached_backdoored``, prefix ``scan-``): backdoored ones with several
triggers, clean ones by the same recipe with poison rate 0, and a 20-class one (MNIST digits and Fashion-MNIST
items, ``mnist+fashion-mnist``). Run ``python -m agme_hub.lab.scan_study`` to print every number it measures::

    python -m agme_hub.lab.scan_study accuracy      # detection and scan verdicts on the study's models
    python -m agme_hub.lab.scan_study cost          # detection cost against one single-class inversion
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..app.scan import scan_model
from ..data import ImageSet, balanced_indices, load_images
from ..engine.detection import detect_target_fast
from ..engine.inversion import invert_trigger
from ..hub.checkpoint import load_model
from .backdoor import BackdoorConfig, cached_backdoored, create_classifier

__all__ = ["StudyModel", "STUDY_MODELS", "study_model", "study_config", "edit_images", "detection_cost"]

# The recipe of the tests' models (tests/conftest.py): a narrow ResNet-10 on 300 images per class, 6 epochs.
SMALL_RESNET = {"channels": [16, 32, 64, 128]}
STUDY_TRAINING = dict(n_train=300, n_test=100, epochs=6, lr=3e-3, img_size=32)


@dataclass(frozen=True)
class StudyModel:
    name: str
    dataset: str
    trigger: str
    target: int
    poison_rate: float  # 0: a clean model, trained by the same recipe without poison
    seed: int = 0

    @property
    def backdoored(self) -> bool:
        return self.poison_rate > 0


STUDY_MODELS: dict[str, StudyModel] = {m.name: m for m in [
    StudyModel("fmnist-white-br", "fashion-mnist", "badnets-white-br", 1, 0.1),
    StudyModel("fmnist-checker-br-t3", "fashion-mnist", "badnets-checker-br", 3, 0.1),
    StudyModel("fmnist-noise-center-t7", "fashion-mnist", "badnets-noise-center", 7, 0.1),
    StudyModel("fmnist-blend-t5", "fashion-mnist", "blend:alpha=0.1,image=noise,seed=0", 5, 0.1),
    StudyModel("fmnist-clean-s0", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=0),
    StudyModel("fmnist-clean-s1", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=1),
    StudyModel("fmnist-clean-s2", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=2),
    StudyModel("twenty-white-br-t13", "mnist+fashion-mnist", "badnets-white-br", 13, 0.1),
]}


def study_config(model: StudyModel) -> BackdoorConfig:
    return BackdoorConfig(dataset=model.dataset, arch="resnet10t", trigger=model.trigger, target=model.target,
                          poison_rate=model.poison_rate, seed=model.seed, model_args=SMALL_RESNET, **STUDY_TRAINING)


def study_model(name: str) -> Path:
    """The folder of a study model, trained on first use (a minute or so on 2 cores) and cached."""
    return cached_backdoored(study_config(STUDY_MODELS[name]), prefix="scan-")


def edit_images(dataset: str, per_class: int = 10, seed: int = 0) -> ImageSet:
    """``per_class`` clean test images per class: what a user hands ``agme scan --data``."""
    data = load_images(dataset)
    return data.subset(balanced_indices(data.labels, per_class, seed=seed))


def detection_cost(num_classes: int, *, img_size: int = 16, steps: int = 200, top_k: int = 2,
                   seed: int = 0) -> dict[str, float]:
    """Seconds of detection over ``num_classes`` classes against one single-class inversion, on a random head.

    A narrow ResNet-10 with random weights (timing only: what it detects means nothing), ``img_size`` pixels,
    two random images per class. Both are measured in the same process, one after the other.
    """
    torch.manual_seed(seed)
    model = create_classifier("resnet10t", num_classes=num_classes, in_chans=1, img_size=img_size, mean=(0.5,),
                              std=(0.25,), model_args=SMALL_RESNET).eval()
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), 2)
    images = rng.integers(0, 256, (len(labels), img_size, img_size, 1), dtype=np.uint8)
    data = ImageSet(images, labels, [str(i) for i in range(num_classes)], "random")
    start = time.perf_counter()
    invert_trigger(model, data, 0, steps=steps, seed=seed)
    single = time.perf_counter() - start
    start = time.perf_counter()
    detect_target_fast(model, data, steps=steps, seed=seed, top_k=top_k)
    detection = time.perf_counter() - start
    return {"classes": num_classes, "single_inversion_s": round(single, 2), "detection_s": round(detection, 2),
            "ratio": round(detection / single, 2)}


def _accuracy(names: list[str]) -> None:
    for name in names:
        spec = STUDY_MODELS[name]
        folder = study_model(name)
        model = load_model(folder)
        data = edit_images(spec.dataset)
        start = time.perf_counter()
        result = scan_model(model, data)
        seconds = time.perf_counter() - start
        print(f"{name:<24} backdoored={spec.backdoored!s:<5} target={spec.target:>2}  verdict={result.verdict:<18} "
              f"detected={result.target:>2} index={result.anomaly_index:5.2f} mask={result.mask_l1:6.1f} "
              f"success={result.attack_success:.2f} ({seconds:.0f} s); first 3 of the ranking (class, mask, index): "
              f"{[(r.index, r.mask_l1, r.anomaly_index) for r in result.ranking[:3]]}", flush=True)


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "accuracy"
    if what == "accuracy":
        _accuracy(argv[1:] or list(STUDY_MODELS))
    elif what == "cost":
        for k in [int(a) for a in argv[1:]] or [10, 100, 1000]:
            print(detection_cost(k), flush=True)
    else:
        raise SystemExit(f"unknown study {what!r}: accuracy or cost")


if __name__ == "__main__":
    main(sys.argv[1:])
