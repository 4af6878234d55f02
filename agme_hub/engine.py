"""The engine's one entry point: ``clean(model, data, ...)`` -> :class:`CleanResult`.

Steps: pick the trigger (given, or a surrogate from trigger inversion), capture the Gram statistics of
the candidate layers on D and its augmented copies, choose layers and lam by k-fold cross-validation
on D itself (never on held-out test data), then edit the chosen layers shallow to deep, recomputing
keys through the layers already edited. No gradients flow through the model being edited.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .constants import (DEFAULT_AUGMENT_COPIES, DEFAULT_GAMMA, DEFAULT_LAM_GRID, DEFAULT_PROTECT_GRID,
                        DEFAULT_TARGET_WEIGHT)
from .data import ImageSet, Preprocessor
from .edit import GramStats, apply_edit, augmented_pairs, collect_stats, recompute_batchnorm
from .errors import ClassMismatchError, DataError, UsageError
from .metrics import Metrics, measure, predict
from .nobdk import TargetDetection, detect_target, invert_trigger
from .triggers import Trigger, parse_trigger
from .units import Candidates, find_candidates, resolve_layers

__all__ = ["clean", "evaluate", "CleanResult", "Selection", "inspect_layers"]


@dataclass(frozen=True)
class Selection:
    """What cross-validation chose, and the table it chose from."""

    group: str
    layers: list[str]
    lam: float
    target_weight: float
    folds: int
    table: list[dict[str, float | str | None]]  # one row per (group, lam, protect): pooled held-out CA, TA, ASR, score
    protect: float | None = None  # the repair's null-space constraint (edit.solve_edit), None = weight only

    def describe(self) -> str:
        best = next(r for r in self.table
                    if r["group"] == self.group and r["lam"] == self.lam and r.get("protect") == self.protect)
        protected = f", target keys protected to {self.protect:g} of their energy" if self.protect else ""
        return (f"{self.folds}-fold cross-validation on the edit images chose {self.group} "
                f"({', '.join(self.layers)}) with lam={self.lam:g}{protected}: held-out CA {best['ca']:.1%}, "
                f"TA {best['ta']:.1%}, ASR {best['asr']:.1%} ({len(self.table)} settings tried)")


@dataclass
class CleanResult:
    """The edited model and everything needed to report how it was made."""

    model: torch.nn.Module
    mode: str  # "bdk" or "no-bdk"
    trigger: Trigger  # the trigger used for the edit (given, or the surrogate)
    trigger_kind: str  # "given" or "surrogate"
    target: int | None
    target_detected: bool
    detection: TargetDetection | None
    layers: list[str]
    lam: float
    gamma: float
    target_weight: float
    augment_copies: int
    bn_stats: str
    seed: int
    n_edit_images: int
    selection: Selection | None
    candidates: Candidates | None
    timings: dict[str, float] = field(default_factory=dict)
    unrepaired_model: torch.nn.Module | None = None  # the same edit without the repair (for reporting)
    protect: float | None = None  # the repair's null-space constraint on the target-class keys (chosen by CV)


def _pick_target_from_trigger(model: torch.nn.Module, data: ImageSet, trigger: Trigger,
                              preprocess: Preprocessor) -> int:
    """With the trigger known but not the target: the class triggered images of D go to most."""
    preds = predict(model, data.images, preprocess, trigger=trigger)
    return int(np.bincount(preds, minlength=data.num_classes).argmax())


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
                    flip: bool, protects: tuple[float | None, ...] = (None,)
                    ) -> tuple[Selection, float, dict[str, GramStats]]:
    """Leave-one-fold-out over (group, lam); statistics of a fold are subtracted from the total.

    Also returns the statistics over all of D, which the final edit reuses for its first layer.
    """
    fold_of = _stratified_folds(data.labels, folds, seed)
    names = [n for group in groups.values() for n in group]
    start = time.perf_counter()
    stats = collect_stats(model, names, augmented_pairs(data.images, data.labels, trigger, copies=copies, seed=seed,
                                                        flip=flip),
                          preprocess, target=target, folds=fold_of, num_folds=folds)
    capture_seconds = time.perf_counter() - start
    total = {n: sum(s[1:], s[0]) for n, s in stats.items()}
    triggered = trigger.apply(data.images)
    trial = copy.deepcopy(model)
    table = []
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
                clean_pred[held] = predict(trial, data.images[held], preprocess)
                trig_pred[held] = predict(trial, triggered[held], preprocess)
            is_target = data.labels == target
            ca = float((clean_pred == data.labels).mean())
            ta = float((clean_pred[is_target] == target).mean()) if is_target.any() else 0.0
            asr = float((trig_pred[~is_target] == target).mean()) if (~is_target).any() else 0.0
            table.append({"group": group, "lam": lam, "protect": protect, "ca": ca, "ta": ta, "asr": asr,
                          "score": _score(ca, ta, asr)})
    best = max(table, key=lambda r: r["score"])  # first best wins: entry before classifier, small lam first
    selection = Selection(str(best["group"]), groups[str(best["group"])], float(best["lam"]), target_weight, folds,
                          table, best["protect"])
    return selection, capture_seconds, total


def clean(model: torch.nn.Module, data: ImageSet, *, trigger: str | Trigger | None = None, target: int | None = None,
          repair: bool = True, lam: float | None = None, gamma: float = DEFAULT_GAMMA, layers: list[str] | None = None,
          seed: int = 0, augment_copies: int = DEFAULT_AUGMENT_COPIES, target_weight: float = DEFAULT_TARGET_WEIGHT,
          bn_stats: str = "keep", folds: int = 5, flip: bool = False, inversion_steps: int = 200,
          lam_grid: tuple[float, ...] = DEFAULT_LAM_GRID, inplace: bool = False,
          protect_grid: tuple[float | None, ...] = DEFAULT_PROTECT_GRID) -> CleanResult:
    """Remove a backdoor from ``model`` using the handful of clean images ``data``.

    Args:
        model: a timm classifier; left untouched unless ``inplace``.
        data: the clean, unseen images used for editing (raw, with labels).
        trigger: the known trigger (BDK mode); ``None`` reconstructs a surrogate (no-BDK mode).
        target: the target class; ``None`` detects it (from the trigger, or by inversion of every class).
        repair: weight the clean target-class images ``target_weight`` times in the preserve term, and let the
            cross-validation choose a null-space constraint on their keys from ``protect_grid`` (None = none).
        lam: ridge of the edit; ``None`` chooses it by cross-validation from ``lam_grid``.
        layers: module names or globs to edit; ``None`` chooses among the candidates by cross-validation.
        bn_stats: ``keep`` or ``recompute`` the BatchNorm running averages after the edited layers.

    Returns:
        CleanResult with the edited model and what was chosen, detected and timed.
    """
    if bn_stats not in {"keep", "recompute"}:
        raise UsageError(f"bn_stats must be keep or recompute, got {bn_stats!r}")
    if (lam is not None and lam <= 0) or gamma < 0 or augment_copies < 0 or folds < 2:
        raise UsageError("lam must be > 0, gamma >= 0, augment copies >= 0 and folds >= 2")
    if target is not None and not 0 <= target < data.num_classes:
        raise ClassMismatchError(f"target class {target} is out of range: 0..{data.num_classes - 1}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != data.num_classes:
        raise ClassMismatchError(f"the model has {num_classes} classes, the data {data.num_classes}")
    timings: dict[str, float] = {}
    model.eval()
    edited = model if inplace else copy.deepcopy(model)
    original = copy.deepcopy(model) if inplace else model
    preprocess = Preprocessor.from_model(model)

    detection = None
    target_detected = target is None
    if trigger is not None:
        mode, trigger_kind, used = "bdk", "given", parse_trigger(trigger)
        if target is None:
            target = _pick_target_from_trigger(original, data, used, preprocess)
    else:
        mode, trigger_kind = "no-bdk", "surrogate"
        start = time.perf_counter()
        if target is None:
            detection = detect_target(original, data, steps=inversion_steps, seed=seed)
            target = detection.target
            used = detection.inversions[target].trigger
        else:
            used = invert_trigger(original, data, target, steps=inversion_steps, seed=seed).trigger
        timings["inversion"] = time.perf_counter() - start
    weight = target_weight if repair else 1.0
    protects = tuple(protect_grid) if repair else (None,)

    candidates = None
    sample = preprocess(data.images[:2])
    if layers:
        groups = {"given": resolve_layers(original, layers)}
    else:
        candidates = find_candidates(original, sample)
        groups = candidates.groups
    selection = None
    captured: dict[str, GramStats] = {}  # statistics over all of D on the unedited model, from the CV
    if lam is None or len(groups) > 1:
        if len(data) < folds:
            raise DataError(f"cross-validation needs at least {folds} edit images; pass --lam and --layers")
        grid = (lam,) if lam is not None else tuple(lam_grid)
        start = time.perf_counter()
        selection, cv_capture, captured = _cross_validate(original, data, used, target, preprocess, groups, grid, gamma=gamma,
                                                target_weight=weight, copies=augment_copies, folds=folds, seed=seed,
                                                flip=flip, protects=protects)
        timings["selection"] = time.perf_counter() - start
        timings["selection_capture"] = cv_capture
        chosen_layers, chosen_lam, chosen_protect = selection.layers, selection.lam, selection.protect
    else:
        # lam and layers given: no cross-validation, so the repair is the weight alone
        chosen_layers, chosen_lam, chosen_protect = next(iter(groups.values())), float(lam), None

    # The final edit: shallow to deep; keys of each layer come through the layers already edited.
    timings["capture"] = timings["solve"] = timings["bn_stats"] = 0.0
    w0 = {n: _weight_matrix(original, n) for n in chosen_layers}
    final_stats: dict[str, GramStats] = {}
    for position, name in enumerate(chosen_layers):
        start = time.perf_counter()
        if position == 0 and name in captured:  # nothing upstream is edited yet: the CV's keys are these keys
            final_stats[name] = captured[name]
        else:
            pairs = augmented_pairs(data.images, data.labels, used, copies=augment_copies, seed=seed, flip=flip)
            final_stats[name] = collect_stats(edited, [name], pairs, preprocess, target=target)[name][0]
        timings["capture"] += time.perf_counter() - start
        start = time.perf_counter()
        apply_edit(edited, {name: final_stats[name]}, lam=chosen_lam, gamma=gamma, target_weight=weight,
                   original={name: w0[name]}, protect=chosen_protect)
        timings["solve"] += time.perf_counter() - start
        if bn_stats == "recompute":
            start = time.perf_counter()
            batches = [preprocess(np.concatenate([data.images[i:i + 128], used.apply(data.images[i:i + 128])]))
                       for i in range(0, len(data), 128)]
            recompute_batchnorm(edited, name, batches)
            timings["bn_stats"] += time.perf_counter() - start
    edited.eval()
    unrepaired = None
    if (weight != 1.0 or chosen_protect is not None) and bn_stats == "keep":
        # The same edit without the repair weight, for reporting TA with and without repair. Keys of a
        # later layer came through the repaired earlier ones: exact for one layer, close for several.
        unrepaired = copy.deepcopy(edited)
        apply_edit(unrepaired, final_stats, lam=chosen_lam, gamma=gamma, target_weight=1.0, original=w0)
    return CleanResult(edited, mode, used, trigger_kind, target, target_detected, detection, list(chosen_layers),
                       chosen_lam, gamma, weight, augment_copies, bn_stats, seed, len(data), selection, candidates,
                       timings, unrepaired, chosen_protect)


def _weight_matrix(model: torch.nn.Module, name: str) -> torch.Tensor:
    from .units import editable_layer

    return editable_layer(model, name).weight_matrix().clone()


def evaluate(model: torch.nn.Module, data: ImageSet, trigger: str | Trigger | None = None,
             target: int | None = None) -> Metrics:
    """CA, ASR, TA, RA and per-class accuracy of ``model`` on ``data`` (ASR and RA need a trigger)."""
    used = parse_trigger(trigger) if trigger is not None else None
    if target is not None and not 0 <= target < data.num_classes:
        raise ClassMismatchError(f"target class {target} is out of range: 0..{data.num_classes - 1}")
    return measure(model, data, Preprocessor.from_model(model), trigger=used, target=target)


def inspect_layers(model: torch.nn.Module) -> Candidates:
    """The candidate layer groups the engine would choose from for ``model``."""
    preprocess = Preprocessor.from_model(model)
    sample = torch.zeros((2,) + tuple(preprocess.input_size))
    return find_candidates(model, sample)
