"""Triggers held in memory: what agme reconstructs without the real trigger (no-BDK's surrogates).

Each stamps like any :class:`~agme_hub.triggers.Trigger` but is made from arrays, not a spec string, and only at
the image size it was made for:

* :class:`MaskTrigger`: a pattern and mask (the patch surrogate; ``save`` writes PNGs an ``image:`` spec reads);
* :class:`RegionTrigger`: a patch surrogate's mask filled with fresh noise on every image (its place);
* :class:`DeltaTrigger`: a full-image perturbation (``save`` writes a ``.npy`` an ``additive:`` spec reads);
* :class:`WarpTrigger`: a smooth displacement field (the warp surrogate);
* :class:`RandomWarpTrigger`: a fresh random warp of a given size on every image.

The region and random warps draw their noise from a seed and each image's own bytes, so the edit stays
deterministic. ``engine/surrogates.py`` makes them.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from .constants import DEFAULT_SURROGATE_WARP_GRID, DEFAULT_SURROGATE_WARP_PX
from .errors import ShapeMismatchError
from .triggers import Trigger

__all__ = ["MaskTrigger", "RegionTrigger", "DeltaTrigger", "WarpTrigger", "RandomWarpTrigger"]


def _check_surrogate_size(array: np.ndarray, shape: tuple[int, int, int], what: str) -> None:
    """A surrogate is made at one image size and stamps only images of that size."""
    if array.shape[:2] != tuple(shape[:2]):
        raise ShapeMismatchError(f"the surrogate {what} is {array.shape[1]}x{array.shape[0]}, "
                                 f"images are {shape[1]}x{shape[0]}")


@dataclass(frozen=True, eq=False)
class MaskTrigger(Trigger):
    """A pattern and mask held in memory, e.g. a surrogate reconstructed by trigger inversion.

    ``pattern`` is float ``(H, W, C)`` in [0, 255], ``mask`` float ``(H, W, 1)`` in [0, 1]; ``save`` writes
    them as PNGs that an ``image:pattern=...,mask=...`` spec reads back.
    """

    kind: ClassVar[str] = "mask"
    pattern_array: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1), np.float32))
    mask_array: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1), np.float32))

    @property
    def spec(self) -> str:
        h, w, c = self.pattern_array.shape
        return f"surrogate:{w}x{h}x{c},mask_l1={float(self.mask_array.sum()):.1f}"

    def pattern_and_mask(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        _check_surrogate_size(self.pattern_array, shape, "trigger")
        return self.pattern_array, self.mask_array

    def save(self, folder: str | os.PathLike[str]) -> str:
        from PIL import Image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pattern = np.clip(np.rint(self.pattern_array), 0, 255).astype(np.uint8)
        mask = np.clip(np.rint(self.mask_array[..., 0] * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pattern[..., 0] if pattern.shape[-1] == 1 else pattern).save(folder / "surrogate_pattern.png")
        Image.fromarray(mask).save(folder / "surrogate_mask.png")
        return f"image:pattern={folder / 'surrogate_pattern.png'},mask={folder / 'surrogate_mask.png'}"


@dataclass(frozen=True, eq=False)
class RegionTrigger(Trigger):
    """The place of a surrogate patch with fresh uniform noise in it: what any sticker there could show.

    ``mask`` is float ``(H, W, 1)`` in [0, 1] (a patch surrogate's). Each image gets its own noise, drawn from
    ``seed`` and the image's own bytes, so an image and its augmented copies get different noise, and the same
    image always the same (the edit is deterministic). It has no file form: it is made from the patch
    surrogate whenever it is needed.
    """

    kind: ClassVar[str] = "region"
    mask_array: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1), np.float32))
    seed: int = 0

    @property
    def spec(self) -> str:
        h, w, _ = self.mask_array.shape
        return f"surrogate-region:{w}x{h},mask_l1={float(self.mask_array.sum()):.1f}"

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        _check_surrogate_size(self.mask_array, shape, "region")
        noise = np.stack([np.random.default_rng((self.seed, zlib.crc32(image.tobytes())))
                          .uniform(0.0, 255.0, image.shape) for image in x]).astype(np.float32)
        return (1.0 - self.mask_array) * x + self.mask_array * noise


@dataclass(frozen=True, eq=False)
class DeltaTrigger(Trigger):
    """A full-image perturbation held in memory, e.g. a surrogate reconstructed without the trigger.

    ``delta_array`` is float ``(H, W, C)`` in pixel units (of 255): ``x' = clip(x + delta)``. ``save`` writes it
    as a ``.npy`` (in units of 1) that an ``additive:delta=...npy,eps=...`` spec reads back.
    """

    kind: ClassVar[str] = "delta"
    delta_array: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1), np.float32))

    @property
    def spec(self) -> str:
        h, w, c = self.delta_array.shape
        return f"surrogate-delta:{w}x{h}x{c},linf={float(np.abs(self.delta_array).max()) / 255.0:.3f}"

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        _check_surrogate_size(self.delta_array, shape, "perturbation")
        return x + self.delta_array

    def save(self, folder: str | os.PathLike[str]) -> str:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "surrogate_delta.npy"
        np.save(path, (self.delta_array / 255.0).astype(np.float32), allow_pickle=False)
        eps = max(float(np.abs(self.delta_array).max()) / 255.0, 1e-6)
        return f"additive:delta={path},eps={eps:.6f}"


@dataclass(frozen=True, eq=False)
class WarpTrigger(Trigger):
    """A smooth displacement of every pixel held in memory, e.g. a warp surrogate reconstructed without the trigger.

    ``field_array`` is float ``(H, W, 2)``: how far each output pixel reads from, in pixels (x, then y). The image
    is resampled bilinearly, edge pixels repeated past the border: ``grid_sample(..., align_corners=True,
    padding_mode="border")``, the form WaNet-style triggers take. It has no file form.
    """

    kind: ClassVar[str] = "warp"
    field_array: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 2), np.float32))

    @property
    def spec(self) -> str:
        h, w, _ = self.field_array.shape
        return f"surrogate-warp:{w}x{h},max_px={float(np.abs(self.field_array).max()):.2f}"

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        _check_surrogate_size(self.field_array, shape, "warp")
        return _resample(x, self.field_array)  # one field: every image at once


@dataclass(frozen=True, eq=False)
class RandomWarpTrigger(Trigger):
    """Any smooth warp of a warp surrogate's size: a fresh field on every image, pixels moved up to ``max_px``.

    The field is ``grid x grid`` uniform control values in [-1, 1] per axis, interpolated linearly to the image and
    scaled by ``max_px``; each image gets its own, drawn from ``seed`` and the image's own bytes (so the edit is
    deterministic). It has no file form: it is made from the warp surrogate whenever it is needed.
    """

    kind: ClassVar[str] = "random-warp"
    max_px: float = DEFAULT_SURROGATE_WARP_PX
    grid: int = DEFAULT_SURROGATE_WARP_GRID
    seed: int = 0

    @property
    def spec(self) -> str:
        return f"surrogate-random-warp:grid={self.grid},max_px={self.max_px:.2f}"

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        h, w = shape[:2]
        rows, cols = _linear_upsampler(self.grid, h), _linear_upsampler(self.grid, w)
        out = []
        for image in x:
            control = np.random.default_rng((self.seed, zlib.crc32(image.tobytes()))).uniform(
                -1.0, 1.0, (2, self.grid, self.grid))
            field_hw2 = self.max_px * np.stack([rows @ c @ cols.T for c in control], axis=-1)
            out.append(_resample(image, field_hw2.astype(np.float32)))
        return np.stack(out)


def _linear_upsampler(grid: int, size: int) -> np.ndarray:
    """``(size, grid)`` weights that interpolate ``grid`` evenly spaced values linearly onto ``size`` pixels."""
    at = np.linspace(0.0, grid - 1.0, size)
    return np.stack([np.interp(at, np.arange(grid), np.eye(grid)[k]) for k in range(grid)], axis=1)


def _resample(images: np.ndarray, field_hw2: np.ndarray) -> np.ndarray:
    """``images`` (H, W, C) or (N, H, W, C) read at each pixel plus its displacement (x, then y), bilinearly,
    edges repeated: what ``grid_sample(..., align_corners=True, padding_mode="border")`` computes."""
    h, w = images.shape[-3:-1]
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    src_x = np.clip(cols + field_hw2[..., 0], 0, w - 1)
    src_y = np.clip(rows + field_hw2[..., 1], 0, h - 1)
    x0, y0 = np.floor(src_x).astype(int), np.floor(src_y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    top = (1 - fx) * images[..., y0, x0, :] + fx * images[..., y0, x1, :]
    bottom = (1 - fx) * images[..., y1, x0, :] + fx * images[..., y1, x1, :]
    return (1 - fy) * top + fy * bottom
