"""Surrogate triggers for no-BDK: one per trigger family, reconstructed on D without the real trigger.

A backdoor's trigger is unknown, but its family leaves a shape. Two surrogates cover the families agme
knows, each optimised on D minus the target class to send images to the (given or detected) target:

- ``patch``: the Neural Cleanse mask + pattern of :func:`.inversion.invert_trigger`, ``x' = (1 - m) x + m p``
  with a small mask: the shape of BadNets patches and stickers.
- ``full``: a full-image, norm-bounded perturbation ``x' = clip(x + delta)``, ``|delta|_inf <= eps``
  (``delta = eps tanh(P)``, plain cross-entropy toward the target): the shape blended, additive
  (Narcissus-style) and sinusoidal-signal (SIG) triggers take, which no small mask can mimic.

The edit forgets any number of them at once (the sum of their forget terms, :func:`.edit.forget_sum`), and by
default forgets all of them; :func:`forget_sets` names the sets the cross-validation chooses from (with
``MethodOptions.choose_surrogates``: each surrogate alone, and all together). The cross-validation's ASR proxy
is the held-out success of every trigger it forgets, since the real trigger is never used without backdoor
knowledge; it cannot see how much of the real trigger a set covers, which is why it no longer chooses the set.

The patch surrogate is forgotten with its *region* (``MethodOptions.surrogate_region``): its mask filled with
fresh noise on every image (:class:`~agme_hub.triggers.RegionTrigger`). The inversion finds one pattern that
works where the trigger sits; the real sticker shows other pixels there, and forgetting the one pattern left it
working (a noise sticker at the centre of a ConvNeXt: held-out ASR 13.9%; with the region 5.2%, docs/METHOD.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import DEFAULT_INVERSION_STEPS, DEFAULT_SURROGATE_EPS
from ..data import ImageSet
from ..progress import StageCounter
from ..triggers import DeltaTrigger, RegionTrigger, Trigger
from .inversion import Inversion, frozen, invert_trigger, other_class_images

__all__ = ["SURROGATE_KINDS", "Surrogate", "invert_perturbation", "reconstruct_surrogates", "forget_sets"]

SURROGATE_KINDS = ("patch", "full")


@dataclass(frozen=True)
class Surrogate:
    """One reconstructed trigger: its family, the trigger itself, and how well it works on D."""

    kind: str  # "patch" or "full"
    trigger: Trigger
    success: float  # fraction of D minus the target sent to the target
    size: float  # patch: mask L1 (pixels); full: the L-inf norm of delta (of 1)
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
    with frozen(model):  # gradients reach the trigger only
        for _ in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(device)
            stamped = (x[idx] + eps * torch.tanh(logit)).clamp(0.0, 1.0)
            loss = F.cross_entropy(model(preprocess.from_unit(stamped)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress.advance()
        with torch.no_grad():
            # rounded to whole pixel values, as the trigger will stamp it, before measuring its success
            delta = torch.round(255.0 * eps * torch.tanh(logit)) / 255.0
            preds = torch.cat([model(preprocess.from_unit((x[i:i + eval_batch_size] + delta).clamp(0.0, 1.0)))
                               .argmax(1) for i in range(0, n, eval_batch_size)])
            success = float((preds == target).float().mean())
    delta_hwc = (delta[0].permute(1, 2, 0).cpu().numpy() * 255.0).astype(np.float32)
    return Surrogate("full", DeltaTrigger(delta_array=delta_hwc), success, float(np.abs(delta_hwc).max()) / 255.0,
                     time.perf_counter() - start)


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
        else:  # MethodOptions checks the names; this is a programming error
            raise ValueError(f"unknown surrogate kind {kind!r}")
    return out


def forget_sets(surrogates: dict[str, Surrogate], *, region: bool = False, choose: bool = True,
                seed: int = 0) -> dict[str, tuple[Trigger, ...]]:
    """The sets of surrogates the cross-validation chooses from: each alone, then all together (``choose``), or
    all together only.

    ``region``: the patch surrogate always comes with its region (set names ``patch+region``, ...), never alone.
    """
    sets: dict[str, tuple[Trigger, ...]] = {}
    for kind, surrogate in surrogates.items():
        if kind == "patch" and region:
            place = RegionTrigger(mask_array=surrogate.trigger.mask_array, seed=seed)  # type: ignore[attr-defined]
            sets["patch+region"] = (surrogate.trigger, place)
        else:
            sets[kind] = (surrogate.trigger,)
    if len(sets) > 1:
        every = tuple(t for members in sets.values() for t in members)
        sets = {**sets, "+".join(sets): every} if choose else {"+".join(sets): every}
    return sets
