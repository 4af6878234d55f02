"""The engine's one entry point: ``clean(model, data, ...)`` -> :class:`CleanResult`.

Steps: pick the trigger (given, or a surrogate from trigger inversion), capture the Gram statistics of
the candidate layers on D and its augmented copies, choose layers and lam by k-fold cross-validation
on D itself (never on held-out test data; :mod:`.select`), then edit the chosen layers shallow to deep,
recomputing keys through the layers already edited. No gradients flow through the model being edited.
The method's knobs are one :class:`~agme_hub.options.MethodOptions`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import ImageSet, Preprocessor
from ..errors import ClassMismatchError, DataError
from ..options import MethodOptions
from ..triggers import Trigger, parse_trigger
from .classifier import ClassifierView, as_classifier, unwrap
from .edit import GramStats, apply_edit, augmented_pairs, collect_stats, recompute_batchnorm
from .detection import detect_target_fast
from .inversion import TargetDetection, invert_trigger
from .layers import Candidates, editable_layer, find_candidates, resolve_layers
from .metrics import Metrics, measure, predict
from .select import Selection, _cross_validate

__all__ = ["clean", "evaluate", "CleanResult", "Selection", "Timings", "inspect_layers"]


@dataclass(frozen=True, kw_only=True)
class Timings:
    """Seconds spent in each step of :func:`clean`."""

    inversion: float | None = None  # trigger inversion; None when the trigger was given
    selection: float | None = None  # the whole cross-validation, its capture included; None when nothing was chosen
    selection_capture: float | None = None  # the part of ``selection`` spent capturing statistics
    capture: float = 0.0  # the final edit: capturing each edited layer's statistics
    solve: float = 0.0  # the final edit: the closed-form solves
    bn_stats: float = 0.0  # re-estimating BatchNorm averages (bn_stats="recompute")

    @property
    def total_capture(self) -> float:
        """All capturing of statistics: the final edit's and the cross-validation's."""
        return self.capture + (self.selection_capture or 0.0)

    @property
    def total_edit(self) -> float:
        """Everything else that edits: the solves, the cross-validation's trial edits and BatchNorm."""
        return self.solve + (self.selection or 0.0) - (self.selection_capture or 0.0) + self.bn_stats


@dataclass(frozen=True, kw_only=True)
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
    timings: Timings
    unrepaired_model: torch.nn.Module | None = None  # the same edit without the repair (for reporting)
    protect: float | None = None  # the repair's null-space constraint on the target-class keys (chosen by CV)
    # False when neither trigger nor target was given and detection found no evidence of a backdoor: an edit
    # against the surrogate of an ordinary class could only cost accuracy, so the model is returned unchanged.
    edited: bool = True


@dataclass(frozen=True, kw_only=True)
class _TriggerChoice:
    mode: str
    kind: str
    trigger: Trigger
    target: int
    detection: TargetDetection | None
    seconds: float | None


@dataclass(frozen=True, kw_only=True)
class _LayerChoice:
    layers: list[str]
    lam: float
    protect: float | None  # the repair's null-space constraint, chosen by the cross-validation (None: weight only)
    selection: Selection | None
    candidates: Candidates | None
    captured: dict[str, GramStats]  # statistics over all of D on the unedited model, from the cross-validation
    seconds: float | None
    capture_seconds: float | None


def clean(model: torch.nn.Module, data: ImageSet, *, trigger: str | Trigger | None = None, target: int | None = None,
          method: MethodOptions | None = None, inplace: bool = False, preprocess: Preprocessor | None = None,
          **overrides: Any) -> CleanResult:
    """Remove a backdoor from ``model`` using the handful of clean images ``data``.

    Args:
        model: any ``nn.Module`` mapping images to logits (timm, transformers, torchvision, your own); left
            untouched unless ``inplace``. The result's model is of the same kind.
        data: the clean, unseen images used for editing (raw, with labels).
        trigger: the known trigger (BDK mode); ``None`` reconstructs a surrogate (no-BDK mode).
        target: the target class; ``None`` detects it (from the trigger, or by trigger inversion ranked over all
            classes, :mod:`.detection`). With neither trigger nor target, a model in which detection finds no
            outlier is returned unchanged (``edited=False``): there is no evidence of a backdoor to remove.
        method: the method's knobs (repair, layers, lam, gamma, ...; see :class:`MethodOptions`);
            ``None``: the defaults.
        inplace: edit ``model`` itself instead of a copy.
        preprocess: how raw images become the model's input; needed for modules that carry none (timm models
            and models from ``agme_hub.load`` carry their own).
        **overrides: knobs of :class:`MethodOptions` by name, applied over ``method``
            (``clean(model, data, trigger=..., lam=0.1, layers=["fc"])``); an unknown name is a UsageError.

    Returns:
        CleanResult with the edited model and what was chosen, detected and timed.
    """
    method = MethodOptions.with_overrides(method, **overrides)
    if target is not None and not 0 <= target < data.num_classes:
        raise ClassMismatchError(f"target class {target} is out of range: 0..{data.num_classes - 1}")
    caller_model = model
    model = as_classifier(model, preprocess=preprocess)  # a view for transformers and plain torch modules
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != data.num_classes:
        raise ClassMismatchError(f"the model has {num_classes} classes, the data {data.num_classes}")
    model.eval()
    edited = model if inplace else copy.deepcopy(model)
    original = copy.deepcopy(model) if inplace else model
    preprocess = Preprocessor.from_model(model)
    weight = method.target_weight if method.repair else 1.0

    chosen = _choose_trigger(original, data, trigger, target, method=method, preprocess=preprocess)
    if chosen.detection is not None and not chosen.detection.flagged:
        unchanged = unwrap(edited) if model is not caller_model and not isinstance(caller_model, ClassifierView) \
            else edited
        return CleanResult(model=unchanged, mode=chosen.mode, trigger=chosen.trigger, trigger_kind=chosen.kind,
                           target=chosen.target, target_detected=True, detection=chosen.detection, layers=[], lam=0.0,
                           gamma=method.gamma, target_weight=weight, augment_copies=method.augment_copies,
                           bn_stats=method.bn_stats, seed=method.seed, n_edit_images=len(data), selection=None,
                           candidates=None, timings=Timings(inversion=chosen.seconds), edited=False)
    layers = _choose_layers(original, data, chosen, method=method, preprocess=preprocess, weight=weight)
    final_stats, w0, final_seconds = _final_edit(edited, original, data, chosen, layers, method=method,
                                                 preprocess=preprocess, weight=weight)
    unrepaired = None
    if (weight != 1.0 or layers.protect is not None) and method.bn_stats == "keep":
        # The same edit without the repair weight, for reporting TA with and without repair. Keys of a
        # later layer came through the repaired earlier ones: exact for one layer, close for several.
        unrepaired = copy.deepcopy(edited)
        apply_edit(unrepaired, final_stats, lam=layers.lam, gamma=method.gamma, target_weight=1.0, original=w0)
    if model is not caller_model and not isinstance(caller_model, ClassifierView):
        # hand back the kind of module the caller gave
        edited = unwrap(edited)
        unrepaired = unwrap(unrepaired) if unrepaired is not None else None
    timings = Timings(inversion=chosen.seconds, selection=layers.seconds, selection_capture=layers.capture_seconds,
                      **final_seconds)
    return CleanResult(model=edited, mode=chosen.mode, trigger=chosen.trigger, trigger_kind=chosen.kind,
                       target=chosen.target, target_detected=target is None, detection=chosen.detection,
                       layers=list(layers.layers), lam=layers.lam, gamma=method.gamma, target_weight=weight,
                       augment_copies=method.augment_copies, bn_stats=method.bn_stats, seed=method.seed,
                       n_edit_images=len(data), selection=layers.selection, candidates=layers.candidates,
                       timings=timings, unrepaired_model=unrepaired, protect=layers.protect)


def _choose_trigger(model: torch.nn.Module, data: ImageSet, trigger: str | Trigger | None, target: int | None, *,
                    method: MethodOptions, preprocess: Preprocessor) -> _TriggerChoice:
    """The trigger to edit with and the target: given, picked from the trigger, or from trigger inversion."""
    if trigger is not None:
        used = parse_trigger(trigger)
        if target is None:
            target = _pick_target_from_trigger(model, data, used, preprocess)
        return _TriggerChoice(mode="bdk", kind="given", trigger=used, target=target, detection=None, seconds=None)
    start = time.perf_counter()
    detection = None
    if target is None:
        detection = detect_target_fast(model, data, steps=method.inversion_steps, seed=method.seed)
        target = detection.target
        used = detection.inversions[target].trigger
    else:
        used = invert_trigger(model, data, target, steps=method.inversion_steps, seed=method.seed).trigger
    return _TriggerChoice(mode="no-bdk", kind="surrogate", trigger=used, target=target, detection=detection,
                          seconds=time.perf_counter() - start)


def _pick_target_from_trigger(model: torch.nn.Module, data: ImageSet, trigger: Trigger,
                              preprocess: Preprocessor) -> int:
    """With the trigger known but not the target: the class triggered images of D go to most."""
    preds = predict(model, data.images, preprocess, trigger=trigger)
    return int(np.bincount(preds, minlength=data.num_classes).argmax())


def _choose_layers(model: torch.nn.Module, data: ImageSet, chosen: _TriggerChoice, *, method: MethodOptions,
                   preprocess: Preprocessor, weight: float) -> _LayerChoice:
    """The layers and lam to edit with: given, or chosen by cross-validation on D."""
    candidates = None
    if method.layers:
        groups = {"given": resolve_layers(model, list(method.layers))}
    else:
        candidates = find_candidates(model, preprocess(data.images[:2]))
        groups = candidates.groups
    if method.lam is not None and len(groups) == 1:
        # lam and layers given: no cross-validation, so the repair is the weight alone
        return _LayerChoice(layers=next(iter(groups.values())), lam=float(method.lam), protect=None, selection=None,
                            candidates=candidates, captured={}, seconds=None, capture_seconds=None)
    if len(data) < method.folds:
        raise DataError(f"cross-validation needs at least {method.folds} edit images; pass --lam and --layers")
    grid = (method.lam,) if method.lam is not None else method.lam_grid
    start = time.perf_counter()
    selection, capture_seconds, captured = _cross_validate(
        model, data, chosen.trigger, chosen.target, preprocess, groups, grid, gamma=method.gamma, target_weight=weight,
        copies=method.augment_copies, folds=method.folds, seed=method.seed, flip=method.flip,
        protects=tuple(method.protect_grid) if method.repair else (None,))
    return _LayerChoice(layers=selection.layers, lam=selection.lam, protect=selection.protect, selection=selection,
                        candidates=candidates, captured=captured, seconds=time.perf_counter() - start, capture_seconds=capture_seconds)


def _final_edit(edited: torch.nn.Module, original: torch.nn.Module, data: ImageSet, chosen: _TriggerChoice,
                layers: _LayerChoice, *, method: MethodOptions, preprocess: Preprocessor, weight: float
                ) -> tuple[dict[str, GramStats], dict[str, torch.Tensor], dict[str, float]]:
    """Edit the chosen layers of ``edited`` shallow to deep; keys of each layer come through those already edited.

    Returns each layer's statistics, its original weight matrix, and the seconds of capture, solve and bn_stats.
    """
    seconds = {"capture": 0.0, "solve": 0.0, "bn_stats": 0.0}
    used = chosen.trigger
    w0 = {n: _weight_matrix(original, n) for n in layers.layers}
    final_stats: dict[str, GramStats] = {}
    for position, name in enumerate(layers.layers):
        start = time.perf_counter()
        if position == 0 and name in layers.captured:  # nothing upstream is edited yet: the CV's keys are these keys
            final_stats[name] = layers.captured[name]
        else:
            pairs = augmented_pairs(data.images, data.labels, used, copies=method.augment_copies, seed=method.seed,
                                    flip=method.flip)
            final_stats[name] = collect_stats(edited, [name], pairs, preprocess, target=chosen.target)[name][0]
        seconds["capture"] += time.perf_counter() - start
        start = time.perf_counter()
        apply_edit(edited, {name: final_stats[name]}, lam=layers.lam, gamma=method.gamma, target_weight=weight,
                   original={name: w0[name]}, protect=layers.protect)
        seconds["solve"] += time.perf_counter() - start
        if method.bn_stats == "recompute":
            start = time.perf_counter()
            batches = [preprocess(np.concatenate([data.images[i:i + 128], used.apply(data.images[i:i + 128])]))
                       for i in range(0, len(data), 128)]
            recompute_batchnorm(edited, name, batches)
            seconds["bn_stats"] += time.perf_counter() - start
    edited.eval()
    return final_stats, w0, seconds


def _weight_matrix(model: torch.nn.Module, name: str) -> torch.Tensor:
    return editable_layer(model, name).weight_matrix().clone()


def evaluate(model: torch.nn.Module, data: ImageSet, trigger: str | Trigger | None = None,
             target: int | None = None, *, preprocess: Preprocessor | None = None) -> Metrics:
    """CA, ASR, TA, RA and per-class accuracy of ``model`` on ``data`` (ASR and RA need a trigger)."""
    model = as_classifier(model, preprocess=preprocess)
    used = parse_trigger(trigger) if trigger is not None else None
    if target is not None and not 0 <= target < data.num_classes:
        raise ClassMismatchError(f"target class {target} is out of range: 0..{data.num_classes - 1}")
    return measure(model, data, Preprocessor.from_model(model), trigger=used, target=target)


def inspect_layers(model: torch.nn.Module, *, preprocess: Preprocessor | None = None) -> Candidates:
    """The candidate layer groups the engine would choose from for ``model``."""
    model = as_classifier(model, preprocess=preprocess)
    preprocess = Preprocessor.from_model(model)
    sample = torch.zeros((2,) + tuple(preprocess.input_size))
    return find_candidates(model, sample)
