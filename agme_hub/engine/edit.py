"""The closed-form, activation-guided rewrite of a layer (the specification is docs/METHOD.md).

For a layer with weights ``W0`` (bias folded in as a column) and paired keys of clean images ``kc``
and of their triggered twins ``kt``::

    W* = argmin  sum w ||(W - W0) kc||^2 + gamma sum ||W kt - W0 kc||^2 + lam' ||W - W0||^2
       = W0 (Cc + gamma Cct + lam' I) (Cc + gamma Ctt + lam' I)^-1

with ``Cc = sum w kc kc^T``, ``Ctt = sum kt kt^T``, ``Cct = sum kc kt^T`` and
``lam' = lam * mean(diag(Cc + gamma Ctt))`` so that ``lam`` is scale-free. The Gram matrices are
accumulated batch by batch in float64 (memory O(d^2), whatever the number of images), per fold so
that cross-validation can leave one fold out by subtraction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .capture import capture_activations
from ..data import Preprocessor
from ..triggers import Trigger
from .layers import EditableLayer, editable_layer

__all__ = ["GramStats", "PairBatch", "augmented_pairs", "collect_stats", "forget_sum", "solve_edit", "apply_edit",
           "recompute_batchnorm"]


@dataclass
class GramStats:
    """Sufficient statistics of one layer's edit: ``(d, d)`` float64 Gram matrices.

    ``cc_target`` holds the clean target-class rows alone, so that the repair weight can be chosen
    after capture: the weighted preserve matrix is ``cc + (w - 1) cc_target``.
    """

    cc: torch.Tensor
    cc_target: torch.Tensor
    tt: torch.Tensor
    ct: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, dim: int) -> "GramStats":
        z = torch.zeros(dim, dim, dtype=torch.float64)
        return cls(z, z.clone(), z.clone(), z.clone(), 0)

    def add(self, kc: torch.Tensor, kt: torch.Tensor, is_target: torch.Tensor) -> None:
        self.cc += kc.T @ kc
        if bool(is_target.any()):
            kc_target = kc[is_target]
            self.cc_target += kc_target.T @ kc_target
        self.tt += kt.T @ kt
        self.ct += kc.T @ kt
        self.rows += kc.shape[0]

    def __add__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.cc + other.cc, self.cc_target + other.cc_target, self.tt + other.tt,
                         self.ct + other.ct, self.rows + other.rows)

    def __sub__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.cc - other.cc, self.cc_target - other.cc_target, self.tt - other.tt,
                         self.ct - other.ct, self.rows - other.rows)


def forget_sum(stats: list[GramStats]) -> GramStats:
    """One edit that forgets several triggers: ``sum_s gamma ||W kt_s - W0 kc||^2`` beside one preserve term.

    Each element holds the statistics of the same clean keys (the same images and augmentation) paired with
    one trigger's keys, so the preserve terms are equal and counted once; the forget terms ``Ctt``, ``Cct`` add.
    """
    if len(stats) == 1:
        return stats[0]
    first = stats[0]
    return GramStats(first.cc, first.cc_target, first.tt + sum(s.tt for s in stats[1:]),
                     first.ct + sum(s.ct for s in stats[1:]), first.rows)


def solve_edit(w0: torch.Tensor, stats: GramStats, *, lam: float, gamma: float,
               target_weight: float = 1.0, protect: float | None = None) -> torch.Tensor:
    """The closed-form ``W*`` in float64, by a linear solve (never an explicit inverse).

    ``protect`` (the repair's hard constraint, in (0, 1)): the update may not act on the key directions
    that hold this fraction of the clean target-class keys' energy, so the target class keeps its outputs
    there exactly (null-space editing); the edit is the best one in the remaining directions.
    """
    cc = stats.cc + (target_weight - 1.0) * stats.cc_target
    a = cc + gamma * stats.tt
    ridge = lam * float(torch.diagonal(a).mean().clamp_min(1e-12))
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    a = a + ridge * eye
    if protect is not None:
        return w0 + _protected_update(w0, stats, a, gamma=gamma, protect=protect)
    b = w0 @ (cc + gamma * stats.ct + ridge * eye)
    # W a = b with a symmetric  <=>  a W^T = b^T
    return torch.linalg.solve(a, b.T).T


def _protected_update(w0: torch.Tensor, stats: GramStats, a: torch.Tensor, *, gamma: float,
                      protect: float) -> torch.Tensor:
    """``delta = Y V^T`` minimising the edit's objective, ``V`` spanning what the target keys leave free.

    Unconstrained, ``delta a = gamma W0 (Ct - Tt)``; restricted to ``delta = Y V^T`` it is
    ``Y (V^T a V) = gamma W0 (Ct - Tt) V``, a smaller symmetric solve.
    """
    energy, directions = torch.linalg.eigh(stats.cc_target)  # ascending
    energy, directions = energy.flip(0).clamp_min(0.0), directions.flip(1)
    total = float(energy.sum())
    if total <= 0.0:  # no target-class image in D: nothing to protect
        kept = 0
    else:
        kept = int((torch.cumsum(energy, 0) / total < protect).sum()) + 1
    free = directions[:, kept:]
    if free.shape[1] == 0:
        return torch.zeros_like(w0)
    rhs = gamma * w0 @ (stats.ct - stats.tt) @ free
    y = torch.linalg.solve(free.T @ a @ free, rhs.T).T
    return y @ free.T


@dataclass
class PairBatch:
    """Raw clean images, their triggered twins, labels, and the index of the source image in D."""

    clean: np.ndarray
    triggered: np.ndarray
    labels: np.ndarray
    source: np.ndarray


def _augment(images: np.ndarray, rng: np.random.Generator, *, shift: int, flip: bool, noise: float) -> np.ndarray:
    """Random shifts of up to ``shift`` px (edge-replicated), optional horizontal flips, small pixel noise."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    out = np.empty_like(images)
    dy, dx = rng.integers(0, 2 * shift + 1, n), rng.integers(0, 2 * shift + 1, n)
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    if flip:
        flips = rng.random(n) < 0.5
        out[flips] = out[flips, :, ::-1]
    if noise > 0:
        out = np.clip(out + rng.normal(0, noise, out.shape), 0, 255).astype(np.uint8)
    return out


def augmented_pairs(images: np.ndarray, labels: np.ndarray, trigger: Trigger, *, copies: int, seed: int,
                    batch_size: int = 256, flip: bool = False, shift: int = 2, noise: float = 2.0) -> Iterator[PairBatch]:
    """D itself, then ``copies`` seeded augmented copies; the trigger is stamped after augmentation."""
    rng = np.random.default_rng(seed)
    for copy in range(copies + 1):
        batch_images = images if copy == 0 else _augment(images, rng, shift=shift, flip=flip, noise=noise)
        for start in range(0, len(images), batch_size):
            clean = batch_images[start:start + batch_size]
            idx = np.arange(start, start + len(clean))
            yield PairBatch(clean, trigger.apply(clean), labels[idx], idx)


@torch.inference_mode()
def collect_stats(model: torch.nn.Module, layer_names: list[str], pairs: Iterator[PairBatch],
                  preprocess: Preprocessor, *, target: int | None = None,
                  folds: np.ndarray | None = None, num_folds: int = 1) -> dict[str, list[GramStats]]:
    """One pass over the pairs: per layer and per fold, the Gram statistics of the edit.

    Args:
        target: the target class, whose clean rows are also kept apart (for the repair).
        folds: fold index of every source image (cross-validation); ``None`` = one fold.
    """
    model.eval()
    layers = [editable_layer(model, n) for n in layer_names]
    stats = {layer.name: [GramStats.zeros(layer.key_dim) for _ in range(num_folds)] for layer in layers}
    with capture_activations(model, layer_names, stop=True) as trace:
        for batch in pairs:
            n = len(batch.labels)
            trace.run(torch.cat([preprocess(batch.clean), preprocess(batch.triggered)]))
            is_target = torch.as_tensor(batch.labels == target) if target is not None else torch.zeros(n, dtype=torch.bool)
            fold_of = folds[batch.source] if folds is not None else np.zeros(n, np.int64)
            for layer in layers:
                inputs = trace[layer.name].input
                kc, kt = layer.keys(inputs[:n]), layer.keys(inputs[n:])
                per_image = kc.shape[0] // n
                row_target = is_target.repeat_interleave(per_image)
                row_fold = np.repeat(fold_of, per_image)
                for fold in np.unique(row_fold):
                    rows = torch.as_tensor(np.flatnonzero(row_fold == fold))
                    stats[layer.name][fold].add(kc[rows], kt[rows], row_target[rows])
    return stats


def apply_edit(model: torch.nn.Module, stats: dict[str, GramStats], *, lam: float, gamma: float,
               target_weight: float = 1.0, original: dict[str, torch.Tensor] | None = None,
               protect: float | None = None) -> None:
    """Rewrite each layer of ``stats`` in place with its closed-form solution.

    ``original`` holds the ``W0`` of each layer when the model's current weights are not the original.
    """
    for name, layer_stats in stats.items():
        layer: EditableLayer = editable_layer(model, name)
        w0 = original[name] if original is not None else layer.weight_matrix()
        layer.set_weight_matrix(solve_edit(w0, layer_stats, lam=lam, gamma=gamma, target_weight=target_weight,
                                           protect=protect))


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, after: str, batches: list[torch.Tensor]) -> list[str]:
    """Re-estimate the running mean/var of the BatchNorms that come after layer ``after``.

    The paper's ablation: an edit changes what later BatchNorms see. ``batches`` are preprocessed clean
    and triggered images of D; every other module stays in eval mode.
    """
    names = [n for n, _ in model.named_modules()]
    start = names.index(after)
    norms = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and names.index(n) > start]
    saved = {n: m.momentum for n, m in norms}
    model.eval()
    for _, module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the batches
        module.train()
    try:
        for x in batches:
            model(x)
    finally:
        for name, module in norms:
            module.momentum = saved[name]
            module.eval()
    return [n for n, _ in norms]
