"""The closed-form, activation-guided rewrite of a layer (the specification is docs/METHOD.md).

For a layer with weights ``W0`` (bias folded in as a column) and paired keys of clean images ``kc``
and of their triggered twins ``kt``::

    W* = argmin  sum w ||(W - W0) kc||^2 + gamma sum ||W kt - W0 kc||^2 + lam' ||W - W0||^2
       = W0 (Cc + gamma Cct + lam' I) (Cc + gamma Ctt + lam' I)^-1

with ``Cc = sum w kc kc^T``, ``Ctt = sum kt kt^T``, ``Cct = sum kc kt^T`` and
``lam' = lam * mean(diag(Cc + gamma Ctt))`` so that ``lam`` is scale-free. The Gram matrices are
accumulated batch by batch in float64 (memory O(d^2), whatever the number of images), per fold so
that cross-validation can leave one fold out by subtraction. They live where the model runs, or on the CPU
where that device has no float64 (MPS; :func:`agme_hub.devices.stats_device`).

Keys wider than ``constants.MAX_KEY_DIM`` are solved in diagonal blocks of ``b`` consecutive keys: each
block's weights ``W_b`` get the closed form above on that block's statistics alone, with the ridge of the
whole layer, so that ``W_b kt_b`` is pulled to ``W0_b kc_b`` block by block (and therefore ``W kt`` to
``W0 kc``). The update is restricted to that block-diagonal family; memory is ``d * b`` instead of ``d^2``
(:func:`key_block`). Tested against the full solve in ``tests/test_devices.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import BN_RECOMPUTE_BATCH
from ..data import Preprocessor
from ..devices import model_device, stats_device, synchronize
from ..progress import StageCounter
from ..triggers import Trigger
from .capture import capture_activations
from .layers import EditableLayer, editable_layer, key_block

__all__ = ["GramStats", "PairBatch", "augmented_pairs", "collect_stats", "forget_sum", "solve_edit", "apply_edit",
           "recompute_batchnorm", "bn_batches", "key_block"]


@dataclass
class GramStats:
    """Sufficient statistics of one layer's edit: ``(d, d)`` float64 Gram matrices.

    ``cc_target`` holds the clean target-class rows alone, so that the repair weight can be chosen
    after capture: the weighted preserve matrix is ``cc + (w - 1) cc_target``. With ``block`` set (keys
    wider than ``constants.MAX_KEY_DIM``) each matrix is ``(n_blocks, block, block)``: the diagonal blocks
    only, the keys zero-padded to ``n_blocks * block`` (zero keys add nothing and get a zero update).
    """

    cc: torch.Tensor
    cc_target: torch.Tensor
    tt: torch.Tensor
    ct: torch.Tensor
    rows: int = 0
    block: int | None = None

    @classmethod
    def zeros(cls, dim: int, *, block: int | None = None, device: torch.device | str | None = None) -> "GramStats":
        shape = (dim, dim) if block is None else (-(-dim // block), block, block)
        z = torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone(), z.clone(), 0, block)

    def _gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return a.T @ b
        return torch.einsum("mia,mib->iab", self._blocks(a), self._blocks(b))

    def _blocks(self, keys: torch.Tensor) -> torch.Tensor:
        n_blocks, block = self.cc.shape[0], self.cc.shape[1]
        return F.pad(keys, (0, n_blocks * block - keys.shape[1])).reshape(keys.shape[0], n_blocks, block)

    def add(self, kc: torch.Tensor, kt: torch.Tensor, is_target: torch.Tensor) -> None:
        self.cc += self._gram(kc, kc)
        if bool(is_target.any()):
            kc_target = kc[is_target]
            self.cc_target += self._gram(kc_target, kc_target)
        self.tt += self._gram(kt, kt)
        self.ct += self._gram(kc, kt)
        self.rows += kc.shape[0]

    def __add__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.cc + other.cc, self.cc_target + other.cc_target, self.tt + other.tt,
                         self.ct + other.ct, self.rows + other.rows, self.block)

    def __sub__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.cc - other.cc, self.cc_target - other.cc_target, self.tt - other.tt,
                         self.ct - other.ct, self.rows - other.rows, self.block)


def forget_sum(stats: list[GramStats]) -> GramStats:
    """One edit that forgets several triggers: ``sum_s gamma ||W kt_s - W0 kc||^2`` beside one preserve term.

    Each element holds the statistics of the same clean keys (the same images and augmentation) paired with
    one trigger's keys, so the preserve terms are equal and counted once; the forget terms ``Ctt``, ``Cct`` add.
    """
    if len(stats) == 1:
        return stats[0]
    first = stats[0]
    return GramStats(first.cc, first.cc_target, first.tt + sum(s.tt for s in stats[1:]),
                     first.ct + sum(s.ct for s in stats[1:]), first.rows, first.block)


def solve_edit(w0: torch.Tensor, stats: GramStats, *, lam: float, gamma: float,
               target_weight: float = 1.0, protect: float | None = None) -> torch.Tensor:
    """The closed-form ``W*`` in float64, by a linear solve (never an explicit inverse).

    ``protect`` (the repair's hard constraint, in (0, 1)): the update may not act on the key directions
    that hold this fraction of the clean target-class keys' energy, so the target class keeps its outputs
    there exactly (null-space editing); the edit is the best one in the remaining directions. Blocked
    statistics are solved block by block (the constraint too), with the ridge of the whole layer.
    """
    w0 = w0.to(stats.cc.device)
    diagonal = torch.diagonal(stats.cc + (target_weight - 1.0) * stats.cc_target + gamma * stats.tt,
                              dim1=-2, dim2=-1)
    # zero padding adds zeros to the diagonal: the mean over the layer's d real keys
    ridge = lam * max(float(diagonal.sum()) / w0.shape[1], 1e-12)
    if stats.block is None:
        return _solve(w0, stats, ridge=ridge, gamma=gamma, target_weight=target_weight, protect=protect)
    n_blocks, block = stats.cc.shape[0], stats.cc.shape[1]
    padded = F.pad(w0, (0, n_blocks * block - w0.shape[1]))
    solved = [_solve(padded[:, i * block:(i + 1) * block],
                     GramStats(stats.cc[i], stats.cc_target[i], stats.tt[i], stats.ct[i], stats.rows),
                     ridge=ridge, gamma=gamma, target_weight=target_weight, protect=protect)
              for i in range(n_blocks)]
    return torch.cat(solved, dim=1)[:, :w0.shape[1]]


def _solve(w0: torch.Tensor, stats: GramStats, *, ridge: float, gamma: float, target_weight: float,
           protect: float | None) -> torch.Tensor:
    cc = stats.cc + (target_weight - 1.0) * stats.cc_target
    eye = torch.eye(cc.shape[0], dtype=torch.float64, device=cc.device)
    a = cc + gamma * stats.tt + ridge * eye
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
    copy: int = 0  # 0: D itself; 1..copies: an augmented copy


def _augment(images: np.ndarray, rng: np.random.Generator, *, shift: int, flip: bool, noise: float,
             twins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Random shifts of up to ``shift`` px (edge-replicated), optional horizontal flips, small pixel noise.

    ``twins`` (triggered twins of ``images``) get the very same shifts, flips and noise.
    """
    n, h, w, _ = images.shape
    dy, dx = rng.integers(0, 2 * shift + 1, n), rng.integers(0, 2 * shift + 1, n)
    flips = rng.random(n) < 0.5 if flip else None
    pixel_noise = rng.normal(0, noise, images.shape) if noise > 0 else None

    def move(batch: np.ndarray) -> np.ndarray:
        padded = np.pad(batch, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
        out = np.empty_like(batch)
        for i in range(n):
            out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        if flips is not None:
            out[flips] = out[flips, :, ::-1]
        if pixel_noise is not None:
            out = np.clip(out + pixel_noise, 0, 255).astype(np.uint8)
        return out

    return move(images), (move(twins) if twins is not None else None)


def augmented_pairs(images: np.ndarray, labels: np.ndarray, trigger: Trigger, *, copies: int, seed: int,
                    batch_size: int = 256, flip: bool = False, shift: int = 2, noise: float = 2.0) -> Iterator[PairBatch]:
    """D itself, then ``copies`` seeded augmented copies; the trigger is stamped after augmentation.

    A trigger known only on given images (a PairedTrigger) is applied to D once, and each augmented copy
    shifts, flips and noises a clean image and its twin alike.
    """
    rng = np.random.default_rng(seed)
    twins = None if trigger.applies_to_any_image else trigger.apply(images)
    for copy in range(copies + 1):
        if copy == 0:
            batch_images, batch_twins = images, twins
        else:
            batch_images, batch_twins = _augment(images, rng, shift=shift, flip=flip, noise=noise, twins=twins)
        for start in range(0, len(images), batch_size):
            clean = batch_images[start:start + batch_size]
            idx = np.arange(start, start + len(clean))
            triggered = trigger.apply(clean) if batch_twins is None else batch_twins[start:start + batch_size]
            yield PairBatch(clean, triggered, labels[idx], idx, copy)


@torch.inference_mode()
def collect_stats(model: torch.nn.Module, layer_names: list[str], pairs: Iterator[PairBatch],
                  preprocess: Preprocessor, *, target: int | None = None,
                  folds: np.ndarray | None = None, num_folds: int = 1,
                  run: Callable[[PairBatch], object] | None = None,
                  progress: StageCounter | None = None) -> dict[str, list[GramStats]]:
    """One pass over the pairs: per layer and per fold, the Gram statistics of the edit.

    The pairs run on the device the model is on; the statistics accumulate there in float64, or on the CPU
    where the device has no float64.

    Args:
        target: the target class, whose clean rows are also kept apart (for the repair).
        folds: fold index of every source image (cross-validation); ``None`` = one fold.
        run: how a batch (clean rows first, then triggered) goes through ``model``; default: the whole
            network on the preprocessed images. The engine passes a replay from cached activations
            (:mod:`.replay`) or a pass that also keeps them.
        progress: counts the images (clean and triggered) that went through the network.
    """
    model.eval()
    device = model_device(model)
    where = stats_device(device)
    layers = [editable_layer(model, n) for n in layer_names]
    stats = {layer.name: [GramStats.zeros(layer.key_dim, block=key_block(layer.key_dim), device=where)
                          for _ in range(num_folds)] for layer in layers}
    if run is None:
        def run(batch: PairBatch) -> object:
            return model(torch.cat([preprocess(batch.clean), preprocess(batch.triggered)]).to(device))

    with capture_activations(model, layer_names, stop=True) as trace:
        for batch in pairs:
            n = len(batch.labels)
            trace.call(run, batch)  # ends once every traced layer has run
            is_target = torch.as_tensor(batch.labels == target) if target is not None else torch.zeros(n, dtype=torch.bool)
            fold_of = folds[batch.source] if folds is not None else np.zeros(n, np.int64)
            for layer in layers:
                inputs = trace[layer.name].input.to(where)
                kc, kt = layer.keys(inputs[:n]), layer.keys(inputs[n:])
                per_image = kc.shape[0] // n
                row_target = is_target.repeat_interleave(per_image).to(where)
                row_fold = np.repeat(fold_of, per_image)
                for fold in np.unique(row_fold):
                    rows = torch.as_tensor(np.flatnonzero(row_fold == fold), device=where)
                    stats[layer.name][fold].add(kc[rows], kt[rows], row_target[rows])
            if progress is not None:
                progress.advance(2 * n)
    synchronize(where)  # the capture's time is its own, not the next step's
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


def bn_batches(images: np.ndarray, triggers: tuple[Trigger, ...], preprocess: Preprocessor) -> list[torch.Tensor]:
    """Clean images of D and their copies under every trigger, preprocessed, ``BN_RECOMPUTE_BATCH`` clean per batch."""
    chunks = [images[i:i + BN_RECOMPUTE_BATCH] for i in range(0, len(images), BN_RECOMPUTE_BATCH)]
    return [preprocess(np.concatenate([chunk] + [trigger.apply(chunk) for trigger in triggers])) for chunk in chunks]


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
        device = model_device(model)
        for x in batches:
            model(x.to(device))
    finally:
        for name, module in norms:
            module.momentum = saved[name]
            module.eval()
    return [n for n, _ in norms]
