"""A trigger that is a transform, not a stamp: a WaNet-style warp, shipped as an example callable trigger.

WaNet (Nguyen & Tran, ICLR 2021) bends every image by one fixed, smooth random displacement field: a
``grid x grid`` field of random offsets, normalised to mean absolute value 1, upsampled bicubically to the
image and scaled by ``strength / height``, added to the identity sampling grid and applied with
``grid_sample``. Nothing is pasted, so no mask or pattern describes it. agme takes it as a function::

    agme clean SOURCE --data imgs/ --trigger python:agme_hub.lab.warps:wanet_warp --target 0
    agme_hub.clean(model, data, trigger=agme_hub.lab.warps.wanet_warp, target=0)

``wanet_warp`` is WaNet's field (k = 4) at a stronger ``strength`` than the paper's 0.5, so that the small
models of the tests and the bench learn it in a few epochs without WaNet's noise mode
(``python -m agme_hub.lab.warps`` prints the pixels it moves). ``make_warp`` builds others.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["warp_grid", "make_warp", "wanet_warp", "other_warp", "WANET_GRID", "WANET_STRENGTH", "WANET_SEED"]

WANET_GRID = 4  # WaNet's k: control points per side of the random field
WANET_STRENGTH = 2.0  # WaNet's s is 0.5; a stronger field is learnt by a small model in a few epochs
WANET_SEED = 0


@lru_cache(maxsize=16)
def warp_grid(height: int, width: int, *, grid: int = WANET_GRID, strength: float = WANET_STRENGTH,
              seed: int = WANET_SEED) -> torch.Tensor:
    """The sampling grid ``(1, H, W, 2)`` in [-1, 1] of the seeded warp, as ``grid_sample`` takes it."""
    offsets = torch.as_tensor(np.random.default_rng(seed).uniform(-1.0, 1.0, (1, 2, grid, grid)), dtype=torch.float32)
    offsets = offsets / offsets.abs().mean()
    field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((cols, rows), dim=-1)[None]  # grid_sample reads (x, y)
    return (identity + strength * field / height).clamp(-1, 1)


def make_warp(*, grid: int = WANET_GRID, strength: float = WANET_STRENGTH,
              seed: int = WANET_SEED) -> Callable[[np.ndarray], np.ndarray]:
    """A trigger function uint8 ``(N, H, W, C)`` -> uint8 of the same shape: the seeded warp of every image."""

    def warp(images: np.ndarray) -> np.ndarray:
        n, h, w, _ = images.shape
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
        sampling = warp_grid(h, w, grid=grid, strength=strength, seed=seed).expand(n, -1, -1, -1)
        out = F.grid_sample(x, sampling, mode="bilinear", padding_mode="border", align_corners=True)
        return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    warp.__qualname__ = f"make_warp(grid={grid}, strength={strength:g}, seed={seed})"
    return warp


_DEFAULT = make_warp()


def wanet_warp(images: np.ndarray) -> np.ndarray:
    """The default WaNet-style warp (``WANET_GRID``, ``WANET_STRENGTH``, ``WANET_SEED``) of uint8 ``(N, H, W, C)``."""
    return _DEFAULT(images)


_OTHER = make_warp(grid=6, strength=WANET_STRENGTH, seed=1)


def other_warp(images: np.ndarray) -> np.ndarray:
    """A second warp, made after agme's warp surrogate was fixed, to check it on a field it was not set from: another
    seed and a finer field (k = 6), which moves pixels up to 2.37 px at 28 px, past the surrogate's 2-px bound."""
    return _OTHER(images)


if __name__ == "__main__":  # how far the warp moves pixels, and how much it changes 28 px Fashion-MNIST images
    from ..data import load_images

    images = load_images("fashion-mnist").images[:1000]
    moved = (warp_grid(28, 28) - warp_grid(28, 28, strength=0.0)).abs() * 27 / 2
    change = np.abs(wanet_warp(images).astype(int) - images.astype(int))
    print(f"displacement (px): mean {moved.mean():.2f}, max {moved.max():.2f}; "
          f"pixel change (of 255): mean {change.mean():.1f}, max {change.max()}")
