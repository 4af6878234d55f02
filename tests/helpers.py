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

