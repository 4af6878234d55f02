"""Surrogate triggers for no-BDK: one per trigger family, reconstructed on D without the real trigger.

A backdoor's trigger is unknown, but its family leaves a shape. Three surrogates cover the families agme
knows, each optimised on D minus the target class to send images to the (given or detected) target:

- ``patch``: the Neural Cleanse mask + pattern of :func:`.inversion.invert_trigger`, ``x' = (1 - m) x + m p``
  with a small mask: the shape of BadNets patches and stickers.
- ``full``: a full-image, norm-bounded perturbation ``x' = clip(x + delta)``, ``|delta|_inf <= eps``
  (``delta = eps tanh(P)``, plain cross-entropy toward the target): the shape blended, additive
  (Narcissus-style) and sinusoidal-signal (SIG) triggers take, which no small mask can mimic.
- ``warp``: a smooth displacement field of at most 2 px (:func:`invert_warp`): the shape of WaNet-style warps,
  which move every pixel a little and paste nothing. It is made only on evidence (:func:`warp_evidence`): fresh
  random warps of its size must reach the target clearly more often than D's natural confusion. An optimised
  warp reaches the target on almost any backdoored model, and forgetting it where nothing warps cost accuracy.

The edit forgets any number of them at once (the sum of their forget terms, :func:`.edit.forget_sum`), and by
default forgets all of them; :func:`forget_sets` names the sets the cross-validation chooses from (with
``MethodOptions.choose_surrogates``: each surrogate alone, and all together). The cross-validation's ASR proxy
is the held-out success of every trigger it forgets, since the real trigger is never used without backdoor
knowledge; it cannot see how much of the real trigger a set covers, which is why it no longer chooses the set.

The patch surrogate is forgotten with its *region* (``MethodOptions.surrogate_region``): its mask filled with
fresh noise on every image (:class:`~agme_hub.surrogate_triggers.RegionTrigger`). The inversion finds one
pattern that works where the trigger sits; the real sticker shows other pixels there, and forgetting the one
pattern left it working (a noise sticker at the centre of a ConvNeXt: held-out ASR 13.9%; with the region 5.2%, docs/METHOD.md).
The warp surrogate comes likewise with *any warp* of its size, a fresh random field on every image
(:class:`~agme_hub.surrogate_triggers.RandomWarpTrigger`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import (DEFAULT_INVERSION_STEPS, DEFAULT_SURROGATE_EPS, DEFAULT_SURROGATE_WARP_GRID,
                         DEFAULT_SURROGATE_WARP_PX, SURROGATE_KINDS, WARP_EVIDENCE_DRAWS,
                         WARP_EVIDENCE_MARGIN)
from ..data import ImageSet, Preprocessor
from ..errors import DataError
from ..progress import StageCounter
from ..surrogate_triggers import DeltaTrigger, RandomWarpTrigger, RegionTrigger, WarpTrigger
from ..triggers import Trigger
from .inversion import Inversion, frozen, invert_trigger, optimise, other_class_images
from .metrics import natural_confusion, predict

__all__ = ["SURROGATE_KINDS", "Surrogate", "invert_perturbation", "invert_warp", "WarpEvidence", "warp_evidence",
           "reconstruct_surrogates", "forget_sets"]


@dataclass(frozen=True)
class Surrogate:
    """One reconstructed trigger: its family, the trigger itself, and how well it works on D."""

    kind: str  # "patch", "full" or "warp"
    trigger: Trigger
    success: float  # fraction of D minus the target sent to the target
    size: float  # patch: mask L1 (pixels); full: the L-inf norm of delta (of 1); warp: the largest move (pixels)
    seconds: float


def invert_perturbation(model: torch.nn.Module, data: ImageSet, target: int, *, eps: float = DEFAULT_SURROGATE_EPS,
                        steps: int = DEFAULT_INVERSION_STEPS, lr: float = 0.1, batch_size: int = 64,
                        seed: int = 0, eval_batch_size: int = 256, progress: StageCounter | None = None) -> Surrogate:
    """A full-image perturbation ``|delta|_inf <= eps`` that sends D minus class ``target`` to ``target``.

    Runs on the model's device; random draws come from a CPU generator (the same draws on every device).
    """
    start = time.perf_counter()
    preprocess, device, x = other_class_images(model, data, target)
    n, c, h, w = x.shape
    generator = torch.Generator().manual_seed(seed + 7919 * target + 1)
    logit = (0.1 * torch.randn(1, c, h, w, generator=generator)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([logit], lr=lr, betas=(0.5, 0.9))
    labels = torch.full((n,), target, dtype=torch.long, device=device)
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        stamped = (x[idx] + eps * torch.tanh(logit)).clamp(0.0, 1.0)
        return F.cross_entropy(model(preprocess.from_unit(stamped)), labels[idx])

    with frozen(model):  # gradients reach the trigger only
        optimise(loss_of, optimizer, steps=steps, rows=n, batch_size=batch_size, generator=generator, device=device,
                 progress=progress)
        with torch.no_grad():
            # rounded to whole pixel values, as the trigger will stamp it, before measuring its success
            delta = torch.round(255.0 * eps * torch.tanh(logit)) / 255.0
            preds = torch.cat([model(preprocess.from_unit((x[i:i + eval_batch_size] + delta).clamp(0.0, 1.0)))
                               .argmax(1) for i in range(0, n, eval_batch_size)])
            success = float((preds == target).float().mean())
    delta_hwc = (delta[0].permute(1, 2, 0).cpu().numpy() * 255.0).astype(np.float32)
    return Surrogate("full", DeltaTrigger(delta_array=delta_hwc), success, float(np.abs(delta_hwc).max()) / 255.0,
                     time.perf_counter() - start)


def invert_warp(model: torch.nn.Module, data: ImageSet, target: int, *, max_px: float = DEFAULT_SURROGATE_WARP_PX,
                grid: int = DEFAULT_SURROGATE_WARP_GRID, steps: int = DEFAULT_INVERSION_STEPS, lr: float = 0.1,
                batch_size: int = 64, seed: int = 0, eval_batch_size: int = 256,
                progress: StageCounter | None = None) -> Surrogate:
    """A smooth warp, at most ``max_px`` pixels along each axis, that sends D minus class ``target`` to ``target``.

    The field is ``grid x grid`` control values per axis, upsampled bicubically to the image and bounded by
    ``max_px tanh``; images are resampled as :class:`~agme_hub.surrogate_triggers.WarpTrigger` does. Runs on the
    model's device; random draws come from a CPU generator (the same draws on every device).
    """
    start = time.perf_counter()
    preprocess, device, x = other_class_images(model, data, target)
    n, _, h, w = x.shape
    generator = torch.Generator().manual_seed(seed + 7919 * target + 2)
    control = (0.1 * torch.randn(1, 2, grid, grid, generator=generator)).to(device).requires_grad_(True)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    pixels = torch.stack((cols, rows), dim=-1)[None].to(device)  # (1, H, W, 2): x, then y, as grid_sample reads
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=device)

    def displacement() -> torch.Tensor:  # (1, H, W, 2) in pixels
        up = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)
        return (max_px * torch.tanh(up)).permute(0, 2, 3, 1)

    def warped(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        sampling = ((pixels + field) * scale - 1.0).expand(len(images), -1, -1, -1)
        return F.grid_sample(images, sampling, mode="bilinear", padding_mode="border", align_corners=True)

    optimizer = torch.optim.Adam([control], lr=lr, betas=(0.5, 0.9))
    labels = torch.full((n,), target, dtype=torch.long, device=device)
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(preprocess.from_unit(warped(x[idx], displacement()))), labels[idx])

    with frozen(model):  # gradients reach the warp only
        optimise(loss_of, optimizer, steps=steps, rows=n, batch_size=batch_size, generator=generator, device=device,
                 progress=progress)
        with torch.no_grad():
            field = displacement()
            preds = torch.cat([model(preprocess.from_unit(warped(x[i:i + eval_batch_size], field))).argmax(1)
                               for i in range(0, n, eval_batch_size)])
            success = float((preds == target).float().mean())
    field_hw2 = field[0].cpu().numpy().astype(np.float32)
    return Surrogate("warp", WarpTrigger(field_array=field_hw2), success, float(np.abs(field_hw2).max()),
                     time.perf_counter() - start)


@dataclass(frozen=True)
class WarpEvidence:
    """Do fresh random warps of the warp surrogate's size send D minus the target to the target more often than
    D does by itself? A model that learnt a warp trigger answers yes; a sticker or blend backdoor does not."""

    random_warp_rate: float  # fraction of the warped copies of D minus the target predicted as the target
    natural_rate: float  # fraction of D minus the target predicted as the target, unwarped
    margin: float = WARP_EVIDENCE_MARGIN

    @property
    def found(self) -> bool:
        return self.random_warp_rate - self.natural_rate >= self.margin


def warp_evidence(model: torch.nn.Module, data: ImageSet, target: int, *, max_px: float = DEFAULT_SURROGATE_WARP_PX,
                  grid: int = DEFAULT_SURROGATE_WARP_GRID, draws: int = WARP_EVIDENCE_DRAWS, seed: int = 0,
                  batch_size: int = 256) -> WarpEvidence:
    """Whether a warp surrogate is worth making: ``draws`` random warps of every image of D minus ``target``."""
    others = data.images[data.labels != target]
    if len(others) == 0:
        raise DataError(f"the warp evidence for class {target} needs images of other classes")
    preprocess = Preprocessor.from_model(model)
    natural = natural_confusion(model, data, preprocess, target, batch_size=batch_size)
    warped = np.mean([predict(model, others, preprocess, trigger=RandomWarpTrigger(max_px=max_px, grid=grid,
                                                                                   seed=seed + draw),
                              batch_size=batch_size) == target for draw in range(draws)])
    return WarpEvidence(float(warped), natural)


def _from_inversion(inversion: Inversion) -> Surrogate:
    return Surrogate("patch", inversion.trigger, inversion.success, inversion.mask_l1, inversion.seconds)


def reconstruct_surrogates(model: torch.nn.Module, data: ImageSet, target: int, kinds: tuple[str, ...], *,
                           steps: int = DEFAULT_INVERSION_STEPS, seed: int = 0,
                           patch: Inversion | None = None, eval_batch_size: int = 256,
                           progress: StageCounter | None = None) -> dict[str, Surrogate]:
    """One surrogate of each kind in ``kinds`` for ``target``; ``patch`` reuses an inversion already made
    (target detection makes one per class)."""
    out: dict[str, Surrogate] = {}
    for kind in kinds:
        if kind == "patch":
            out[kind] = _from_inversion(patch if patch is not None
                                        else invert_trigger(model, data, target, steps=steps, seed=seed,
                                                            eval_batch_size=eval_batch_size, progress=progress))
        elif kind == "full":
            out[kind] = invert_perturbation(model, data, target, steps=steps, seed=seed,
                                            eval_batch_size=eval_batch_size, progress=progress)
        elif kind == "warp":
            out[kind] = invert_warp(model, data, target, steps=steps, seed=seed, eval_batch_size=eval_batch_size,
                                    progress=progress)
        else:  # MethodOptions checks the names; this is a programming error
            raise ValueError(f"unknown surrogate kind {kind!r}")
    return out


def forget_sets(surrogates: dict[str, Surrogate], *, region: bool = False, choose: bool = True,
                seed: int = 0) -> dict[str, tuple[Trigger, ...]]:
    """The sets of surrogates the cross-validation chooses from: each alone, then all together (``choose``), or
    all together only.

    ``region``: the patch surrogate always comes with its region (set names ``patch+region``, ...), and the warp
    surrogate with random warps of its size (``warp+random-warp``), never alone.
    """
    sets: dict[str, tuple[Trigger, ...]] = {}
    for kind, surrogate in surrogates.items():
        if kind == "patch" and region:
            place = RegionTrigger(mask_array=surrogate.trigger.mask_array, seed=seed)  # type: ignore[attr-defined]
            sets["patch+region"] = (surrogate.trigger, place)
        elif kind == "warp" and region:
            sets["warp+random-warp"] = (surrogate.trigger, RandomWarpTrigger(max_px=surrogate.size, seed=seed))
        else:
            sets[kind] = (surrogate.trigger,)
    if len(sets) > 1:
        every = tuple(t for members in sets.values() for t in members)
        sets = {**sets, "+".join(sets): every} if choose else {"+".join(sets): every}
    return sets
