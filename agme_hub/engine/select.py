"""Choosing layers and lam by k-fold cross-validation on the edit images themselves (never on test data).

Every (triggers to forget, layer group, lam) is scored on the held-out fold after an edit built from the other
folds; the Gram statistics of a fold are subtracted from the total, so the activations are captured once per
trigger. Without backdoor knowledge the triggers are surrogates (several sets of them) and the ASR on the
held-out fold is that of every surrogate, the same proxy for every set.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import ImageSet, Preprocessor
from ..triggers import Trigger
from .edit import GramStats, apply_edit, augmented_pairs, collect_stats, forget_sum
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
    forget: str = "given"  # the set of triggers forgotten: "given", or surrogates such as "patch", "patch+full"

    def describe(self) -> str:
        best = next(r for r in self.table if r["group"] == self.group and r["lam"] == self.lam
                    and r.get("protect") == self.protect and r.get("forget", "given") == self.forget)
        protected = f", target keys protected to {self.protect:g} of their energy" if self.protect else ""
        forgets = "" if self.forget == "given" else f", forgetting the {self.forget} surrogate(s)"
        asr = "ASR" if self.forget == "given" else "surrogate ASR"
        return (f"{self.folds}-fold cross-validation on the edit images chose {self.group} "
                f"({', '.join(self.layers)}) with lam={self.lam:g}{protected}{forgets}: held-out CA {best['ca']:.1%}, "
                f"TA {best['ta']:.1%}, {asr} {best['asr']:.1%} ({len(self.table)} settings tried)")


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


def _cross_validate(model: torch.nn.Module, data: ImageSet, forget: dict[str, tuple[Trigger, ...]], target: int,
                    preprocess: Preprocessor, groups: dict[str, list[str]], lams: tuple[float, ...], *,
                    gamma: float, target_weight: float, copies: int, folds: int, seed: int,
                    flip: bool, protects: tuple[float | None, ...] = (None,)
                    ) -> tuple[Selection, float, dict[str, GramStats]]:
    """Leave-one-fold-out over (forget set, group, lam, protect); a fold's statistics are subtracted from the total.

    ``forget`` names the sets of triggers an edit may forget together (one set, ``{"given": (trigger,)}``, with
    backdoor knowledge). The held-out ASR is the mean over every trigger of every set, whichever set the edit
    forgot. Also returns the seconds spent capturing, and the chosen set's statistics over all of D, which the
    final edit reuses for its first layer.
    """
    fold_of = _stratified_folds(data.labels, folds, seed)
    names = [n for group in groups.values() for n in group]
    triggers = list({id(t): t for members in forget.values() for t in members}.values())
    start = time.perf_counter()
    # One capture per trigger; the same seed gives every trigger the same augmented clean images.
    by_trigger = {id(t): collect_stats(model, names, augmented_pairs(data.images, data.labels, t, copies=copies,
                                                                     seed=seed, flip=flip),
                                       preprocess, target=target, folds=fold_of, num_folds=folds) for t in triggers}
    capture_seconds = time.perf_counter() - start
    stats = {name: {n: [forget_sum([by_trigger[id(t)][n][f] for t in members]) for f in range(folds)] for n in names}
             for name, members in forget.items()}
    totals = {name: {n: sum(s[1:], s[0]) for n, s in per_layer.items()} for name, per_layer in stats.items()}
    probes = [t.apply(data.images) for t in triggers]
    is_target = data.labels == target
    trial = copy.deepcopy(model)
    table = []
    for forget_name in forget:
        for group, layer_names in groups.items():
            for lam, protect in ((lam, protect) for lam in lams for protect in protects):
                clean_pred = np.empty(len(data), np.int64)
                probe_pred = np.empty((len(probes), len(data)), np.int64)
                for fold in range(folds):
                    held = np.flatnonzero(fold_of == fold)
                    if len(held) == 0:
                        continue
                    trial.load_state_dict(model.state_dict())
                    apply_edit(trial, {n: totals[forget_name][n] - stats[forget_name][n][fold] for n in layer_names},
                               lam=lam, gamma=gamma, target_weight=target_weight, protect=protect)
                    clean_pred[held] = predict(trial, data.images[held], preprocess)
                    for i, triggered in enumerate(probes):
                        probe_pred[i, held] = predict(trial, triggered[held], preprocess)
                ca = float((clean_pred == data.labels).mean())
                ta = float((clean_pred[is_target] == target).mean()) if is_target.any() else 0.0
                asr = float((probe_pred[:, ~is_target] == target).mean()) if (~is_target).any() else 0.0
                table.append({"forget": forget_name, "group": group, "lam": lam, "protect": protect, "ca": ca,
                              "ta": ta, "asr": asr, "score": _score(ca, ta, asr)})
    # first best wins: the first forget set, entry before neck and classifier, small lam first
    best = max(table, key=lambda r: r["score"])
    selection = Selection(group=str(best["group"]), layers=groups[str(best["group"])], lam=float(best["lam"]),
                          target_weight=target_weight, folds=folds, table=table, protect=best["protect"],
                          forget=str(best["forget"]))
    return selection, capture_seconds, totals[selection.forget]
