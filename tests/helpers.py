"""Small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    for i, (image, label) in enumerate(zip(images, labels)):
        write_png(root / names[label] / f"{i:05d}.png", image[..., 0] if image.shape[-1] == 1 else image)
    return root


def save_tiny_model(folder: Path) -> Path:
    """A 3-class, 1-channel timm ``test_resnet`` with seeded random weights, saved as a timm folder."""
    import timm
    import torch

    from agme_hub.hub.checkpoint import save_model

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3, in_chans=1).eval()
    return save_model(model, folder, label_names=["a", "b", "c"], pretrained_cfg={"input_size": (1, 32, 32)},
                      model_args={"in_chans": 1})


def write_three_class_npz(path: Path, per_class: int) -> Path:
    """``per_class`` real Fashion-MNIST test images of each of classes 0, 1, 2 as an .npz."""
    from agme_hub.data import balanced_indices, load_images

    data = load_images("fashion-mnist")
    keep = balanced_indices(data.labels, per_class, seed=1)
    keep = keep[data.labels[keep] < 3]
    np.savez(path, x=data.images[keep], y=data.labels[keep])
    return path



def shipped_fold_scores(model, edit, trigger: str, target: int, layers: list[str], lam: float, *, folds: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """Held-out CA, TA and ASR of the cross-validation's folds, measured on the models ``clean`` ships.

    For each fold, ``clean`` with fixed ``layers`` and ``lam`` edits ``model`` from the other folds' images alone and
    predicts the held fold's. Without augmented copies (``augment_copies=0``) this is exactly what a trial of the
    cross-validation should have scored: its row of the selection table must give the same numbers.
    """
    from agme_hub import clean
    from agme_hub.data import Preprocessor
    from agme_hub.engine.classifier import as_classifier
    from agme_hub.engine.metrics import predict
    from agme_hub.engine.select import _stratified_folds
    from agme_hub.triggers import parse_trigger

    fold_of = _stratified_folds(edit.labels, folds, seed)
    used = parse_trigger(trigger)
    clean_pred = np.empty(len(edit), np.int64)
    probe_pred = np.empty(len(edit), np.int64)
    for fold in range(folds):
        held = np.flatnonzero(fold_of == fold)
        shipped = clean(model, edit.subset(np.flatnonzero(fold_of != fold)), trigger=trigger, target=target,
                        layers=layers, lam=lam, augment_copies=0, seed=seed).model
        shipped = as_classifier(shipped)  # logits from a transformers model too
        preprocess = Preprocessor.from_model(shipped)
        clean_pred[held] = predict(shipped, edit.images[held], preprocess)
        probe_pred[held] = predict(shipped, used.apply(edit.images[held]), preprocess)
    is_target = edit.labels == target
    return {"ca": float((clean_pred == edit.labels).mean()), "ta": float((clean_pred[is_target] == target).mean()),
            "asr": float((probe_pred[~is_target] == target).mean())}
