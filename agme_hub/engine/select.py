"""Choosing layers and lam by k-fold cross-validation on the edit images themselves (never on test data).

Every (layer group, lam) is scored on the held-out fold after an edit built from the other folds; the
Gram statistics of a fold are subtracted from the total, so the activations are captured once.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import ImageSet, Preprocessor
from ..progress import ProgressCallback, StageCounter
from ..triggers import Trigger
from .edit import GramStats, apply_edit, augmented_pairs, collect_stats
from .metrics import predict

__all__ = ["Selection"]


@dataclass(frozen=True, kw_only=True)
class Selection:
    """What cross-validation chose, and the table it chose from."""

    group: str
    layers: list[str]
    lam: float
    target_weight: float
    folds: int
    table: list[dict[str, float | str | None]]  # one row per (group, lam, protect): held-out CA, TA, ASR, score
    protect: float | None = None  # the repair's null-space constraint (edit.solve_edit), None = the weight only

    def describe(self) -> str:
        best = next(r for r in self.table
                    if r["group"] == self.group and r["lam"] == self.lam and r.get("protect") == self.protect)
        protected = f", target keys protected to {self.protect:g} of their energy" if self.protect else ""
        return (f"{self.folds}-fold cross-validation on the edit images chose {self.group} "
                f"({', '.join(self.layers)}) with lam={self.lam:g}{protected}: held-out CA {best['ca']:.1%}, "
                f"TA {best['ta']:.1%}, ASR {best['asr']:.1%} ({len(self.table)} settings tried)")


def _stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        folds[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return folds


def _score(ca: float, ta: float, asr: float) -> float:
    # Removing the backdoor comes first; then keep the clean and the target class. Weights measured
    # on the benchmark grid (docs/METHOD.md).
    return ca + 0.5 * ta - 2.0 * asr


def _cross_validate(model: torch.nn.Module, data: ImageSet, trigger: Trigger, target: int,
                    preprocess: Preprocessor, groups: dict[str, list[str]], lams: tuple[float, ...], *,
                    gamma: float, target_weight: float, copies: int, folds: int, seed: int,
                    flip: bool, protects: tuple[float | None, ...] = (None,), batch_size: int = 512,
                    progress: ProgressCallback | None = None) -> tuple[Selection, float, dict[str, GramStats]]:
    """Leave-one-fold-out over (group, lam, protect); statistics of a fold are subtracted from the total.

    Also returns the seconds spent capturing, and the statistics over all of D, which the final edit
    reuses for its first layer. ``batch_size``: images per forward pass (a clean and a triggered image per pair).
    """
    fold_of = _stratified_folds(data.labels, folds, seed)
    names = [n for group in groups.values() for n in group]
    start = time.perf_counter()
    captured = StageCounter(progress, "capture", 2 * len(data) * (copies + 1), "images")
    stats = collect_stats(model, names, augmented_pairs(data.images, data.labels, trigger, copies=copies, seed=seed,
                                                        flip=flip, batch_size=max(1, batch_size // 2)),
                          preprocess, target=target, folds=fold_of, num_folds=folds, progress=captured)
    capture_seconds = time.perf_counter() - start
    total = {n: sum(s[1:], s[0]) for n, s in stats.items()}
    triggered = trigger.apply(data.images)
    trial = copy.deepcopy(model)
    table = []
    trials = StageCounter(progress, "selection", len(groups) * len(lams) * len(protects) * folds, "trial edits")
    for group, layer_names in groups.items():
        for lam, protect in ((lam, protect) for lam in lams for protect in protects):
            clean_pred = np.empty(len(data), np.int64)
            trig_pred = np.empty(len(data), np.int64)
            for fold in range(folds):
                held = np.flatnonzero(fold_of == fold)
                if len(held) == 0:
                    continue
                trial.load_state_dict(model.state_dict())
                apply_edit(trial, {n: total[n] - stats[n][fold] for n in layer_names}, lam=lam, gamma=gamma,
                           target_weight=target_weight, protect=protect)
                clean_pred[held] = predict(trial, data.images[held], preprocess, batch_size=batch_size)
                trig_pred[held] = predict(trial, triggered[held], preprocess, batch_size=batch_size)
                trials.advance()
            is_target = data.labels == target
            ca = float((clean_pred == data.labels).mean())
            ta = float((clean_pred[is_target] == target).mean()) if is_target.any() else 0.0
            asr = float((trig_pred[~is_target] == target).mean()) if (~is_target).any() else 0.0
            table.append({"group": group, "lam": lam, "protect": protect, "ca": ca, "ta": ta, "asr": asr,
                          "score": _score(ca, ta, asr)})
    best = max(table, key=lambda r: r["score"])  # first best wins: entry before neck and classifier, small lam first
    selection = Selection(group=str(best["group"]), layers=groups[str(best["group"])], lam=float(best["lam"]),
                          target_weight=target_weight, folds=folds, table=table, protect=best["protect"])
    return selection, capture_seconds, total
