"""The engine's one entry point: ``clean(model, data, ...)`` -> :class:`CleanResult`.

Steps: pick the trigger (given, or surrogates reconstructed without it, :mod:`.surrogates`), capture the Gram
statistics of the candidate layers on D and its augmented copies, choose layers and lam (and, without the
trigger, which surrogates to forget) by k-fold cross-validation on D itself (never on held-out test data;
:mod:`.select`), then edit the chosen layers shallow to deep, recomputing keys through the layers already
edited. No gradients flow through the model being edited. The method's knobs are one
:class:`~agme_hub.options.MethodOptions`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import ImageSet, Preprocessor
from ..devices import model_device, pick_batch_size, resolve_device
from ..errors import ClassMismatchError, DataError
from ..options import MethodOptions
from ..progress import ProgressCallback, StageCounter
from ..triggers import Trigger, parse_trigger
from .classifier import ClassifierView, as_classifier, unwrap
from .detection import detect_target_fast
from .edit import GramStats, apply_edit, augmented_pairs, bn_batches, forget_sum, recompute_batchnorm
from .inversion import TargetDetection
from .layers import Candidates, classifier_name, editable_layer, find_candidates, resolve_layers
from .metrics import Metrics, measure, measured_images, predict
from .repair import collect_refit_stats, refit_ridge, solve_refit
from .replay import CachedBoundary, reads_from
from .select import RefitTrial, Selection, _cross_validate, capture_layer, walk_to
from .surrogates import Surrogate, WarpEvidence, forget_sets, reconstruct_surrogates, warp_evidence

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
    trigger: Trigger  # the trigger used for the edit (given, or the first surrogate it forgot)
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
    device: str = "cpu"  # where the clean ran (the returned models are back where the caller's model was)
    batch_size: int = 0  # images per forward pass it used
    refitted: str | None = None  # the classifier re-fitted by the repair's second pass (engine/repair.py), if any
    surrogates: tuple[Surrogate, ...] = ()  # no-BDK: every surrogate reconstructed
    warp_evidence: WarpEvidence | None = None  # no-BDK: whether random warps reach the target (a warp surrogate made)
    forgotten: tuple[Trigger, ...] = ()  # the triggers the edit forgot (the given one, or the chosen surrogates)
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
    forget: dict[str, tuple[Trigger, ...]]  # the sets of triggers an edit may forget together (one when given)
    surrogates: tuple[Surrogate, ...] = ()
    warp_evidence: WarpEvidence | None = None
    scored: tuple[Trigger, ...] = ()  # held-out surrogates: the cross-validation's ASR, never forgotten


@dataclass(frozen=True, kw_only=True)
class _LayerChoice:
    layers: list[str]
    lam: float
    protect: float | None  # the repair's null-space constraint, chosen by the cross-validation (None: weight only)
    selection: Selection | None
    candidates: Candidates | None
    captured: dict[str, GramStats]  # statistics over all of D on the unedited model, from the cross-validation
    boundaries: dict[int, CachedBoundary]  # the chosen group's boundary outputs per forgotten trigger, when kept
    forget: tuple[Trigger, ...]  # the triggers the edit forgets (their forget terms add up)
    seconds: float | None
    capture_seconds: float | None


def clean(model: torch.nn.Module, data: ImageSet, *,
          trigger: str | Trigger | Callable[[np.ndarray], np.ndarray] | None = None, target: int | None = None,
          method: MethodOptions | None = None, inplace: bool = False, preprocess: Preprocessor | None = None,
          device: str | torch.device | None = None, batch_size: int | None = None,
          progress: ProgressCallback | None = None, replay: bool = True, **overrides: Any) -> CleanResult:
    """Remove a backdoor from ``model`` using the handful of clean images ``data``.

    Args:
        model: any ``nn.Module`` mapping images to logits (timm, transformers, torchvision, your own); left
            untouched unless ``inplace``. The result's model is of the same kind.
        data: the clean, unseen images used for editing (raw, with labels).
        trigger: the known trigger (BDK mode): a spec, a :class:`Trigger` (e.g. a ``PairedTrigger`` of triggered
            twins of ``data``) or a function of uint8 images; ``None`` reconstructs surrogates (no-BDK mode).
        target: the target class; ``None`` detects it (from the trigger, or by trigger inversion ranked over all
            classes, :mod:`.detection`). With neither trigger nor target, a model in which detection finds no
            outlier is returned unchanged (``edited=False``): there is no evidence of a backdoor to remove.
        method: the method's knobs (repair, layers, lam, gamma, ...; see :class:`MethodOptions`);
            ``None``: the defaults.
        inplace: edit ``model`` itself instead of a copy.
        preprocess: how raw images become the model's input; needed for modules that carry none (timm models
            and models from ``agme_hub.load`` carry their own).
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``; see
            :mod:`agme_hub.devices`); ``None``: where ``model`` is. The returned models are put back on the
            device ``model`` was on, so the caller's model and the result live together.
        batch_size: images per forward pass; ``None``: sized to the device and the input size. It changes
            the edit only by float rounding (statistics are sums).
        progress: called with a :class:`~agme_hub.progress.StageProgress` as each stage advances.
        replay: run only the layers after a verified boundary when the edit cannot change what comes before
            (:mod:`.replay`); ``False`` runs the whole network every time (the reference it is tested against).
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
    home = model_device(model)
    run_on = resolve_device(device) if device is not None else home
    model.eval()
    if run_on == home:
        edited = model if inplace else copy.deepcopy(model)
        original = copy.deepcopy(model) if inplace else model
    else:  # the caller's model stays where it is (unless inplace); copies run on the device
        original = copy.deepcopy(model).to(run_on)
        edited = model.to(run_on) if inplace else copy.deepcopy(original)
    preprocess = Preprocessor.from_model(model)
    batch = pick_batch_size(batch_size, run_on, preprocess.input_size)
    weight = method.target_weight if method.repair else 1.0

    chosen = _choose_trigger(original, data, trigger, target, method=method, preprocess=preprocess, batch=batch,
                             progress=progress)
    if chosen.detection is not None and not chosen.detection.flagged:
        unchanged = edited.to(home) if run_on != home else edited
        if model is not caller_model and not isinstance(caller_model, ClassifierView):
            unchanged = unwrap(unchanged)
        return CleanResult(model=unchanged, mode=chosen.mode, trigger=chosen.trigger, trigger_kind=chosen.kind,
                           target=chosen.target, target_detected=True, detection=chosen.detection, layers=[], lam=0.0,
                           gamma=method.gamma, target_weight=weight, augment_copies=method.augment_copies,
                           bn_stats=method.bn_stats, seed=method.seed, n_edit_images=len(data), selection=None,
                           candidates=None, timings=Timings(inversion=chosen.seconds), device=str(run_on),
                           batch_size=batch, surrogates=chosen.surrogates, warp_evidence=chosen.warp_evidence,
                           edited=False)
    layers = _choose_layers(original, data, chosen, method=method, preprocess=preprocess, weight=weight, batch=batch,
                            progress=progress, replay=replay)
    if layers.selection is not None:  # the weight the cross-validation chose, where it was offered several
        weight = layers.selection.target_weight
    final_stats, w0, final_seconds = _final_edit(edited, original, data, chosen, layers, method=method,
                                                 preprocess=preprocess, weight=weight, batch=batch, progress=progress,
                                                 replay=replay)
    refitted = _refit_classifier(edited, original, data, chosen, layers, method=method, preprocess=preprocess,
                                 weight=weight, batch=batch, seconds=final_seconds, replay=replay)
    unrepaired = None
    if (weight != 1.0 or layers.protect is not None or refitted) and method.bn_stats == "keep":
        # The same edit without the repair weight, for reporting TA with and without repair. Keys of a
        # later layer came through the repaired earlier ones: exact for one layer, close for several.
        unrepaired = copy.deepcopy(edited)
        apply_edit(unrepaired, final_stats, lam=layers.lam, gamma=method.gamma, target_weight=1.0, original=w0)
        if refitted:  # no repair: the classifier as it was
            editable_layer(unrepaired, refitted).set_weight_matrix(_weight_matrix(original, refitted))
    if run_on != home:  # back where the caller's model is
        edited = edited.to(home)
        unrepaired = unrepaired.to(home) if unrepaired is not None else None
    if model is not caller_model and not isinstance(caller_model, ClassifierView):
        # hand back the kind of module the caller gave
        edited = unwrap(edited)
        unrepaired = unwrap(unrepaired) if unrepaired is not None else None
    timings = Timings(inversion=chosen.seconds, selection=layers.seconds, selection_capture=layers.capture_seconds,
                      **final_seconds)
    return CleanResult(model=edited, mode=chosen.mode, trigger=layers.forget[0], trigger_kind=chosen.kind,
                       target=chosen.target, target_detected=target is None, detection=chosen.detection,
                       layers=list(layers.layers), lam=layers.lam, gamma=method.gamma, target_weight=weight,
                       augment_copies=method.augment_copies, bn_stats=method.bn_stats, seed=method.seed,
                       n_edit_images=len(data), selection=layers.selection, candidates=layers.candidates,
                       timings=timings, unrepaired_model=unrepaired, protect=layers.protect, device=str(run_on),
                       batch_size=batch, refitted=refitted, surrogates=chosen.surrogates,
                       warp_evidence=chosen.warp_evidence, forgotten=layers.forget)


def _choose_trigger(model: torch.nn.Module, data: ImageSet, trigger: str | Trigger | None, target: int | None, *,
                    method: MethodOptions, preprocess: Preprocessor, batch: int,
                    progress: ProgressCallback | None) -> _TriggerChoice:
    """The trigger(s) to edit with and the target: given, picked from the trigger, or surrogates and detection."""
    if trigger is not None:
        used = parse_trigger(trigger)
        if target is None:
            target = _pick_target_from_trigger(model, data, used, preprocess, batch)
        return _TriggerChoice(mode="bdk", kind="given", trigger=used, target=target, detection=None, seconds=None,
                              forget={"given": (used,)})
    start = time.perf_counter()
    detection = None
    patch = None
    # detection costs about three inversions (a joint screening of every class, then the two leaders in full),
    # and its patch surrogate of the detected class is reused
    runs = len(method.surrogates) * (2 if method.held_out_surrogates else 1) + (
        3 - int("patch" in method.surrogates) if target is None else 0)
    steps = StageCounter(progress, "inversion", runs * method.inversion_steps, "steps")
    if target is None:
        detection = detect_target_fast(model, data, steps=method.inversion_steps, seed=method.seed,
                                       eval_batch_size=batch, progress=steps)
        target = detection.target
        # the patch surrogate of the detected class is already made, unless only the full-image evidence chose it
        patch = detection.inversions.get(target)
        if not detection.flagged:  # no evidence: clean() returns the model unchanged, no surrogate is needed
            return _TriggerChoice(mode="no-bdk", kind="surrogate", trigger=patch.trigger, target=target,
                                  detection=detection, seconds=time.perf_counter() - start, forget={})
    kinds, evidence = method.surrogates, None
    if "warp" in kinds and len(kinds) > 1:  # a warp surrogate only where warps reach the target (constants.py)
        evidence = warp_evidence(model, data, target, seed=method.seed, batch_size=batch)
        if not evidence.found:
            kinds = tuple(k for k in kinds if k != "warp")
            steps.advance(method.inversion_steps * (2 if method.held_out_surrogates else 1))  # the skipped runs
    surrogates = reconstruct_surrogates(model, data, target, kinds, steps=method.inversion_steps,
                                        seed=method.seed, patch=patch, eval_batch_size=batch, progress=steps)
    scored: tuple[Surrogate, ...] = ()
    if method.held_out_surrogates:  # another draw of each kind, to score the trials with a trigger they did not forget
        scored = tuple(reconstruct_surrogates(model, data, target, kinds, steps=method.inversion_steps,
                                              seed=method.seed + 1, eval_batch_size=batch, progress=steps).values())
    return _TriggerChoice(mode="no-bdk", kind="surrogate", trigger=next(iter(surrogates.values())).trigger,
                          target=target, detection=detection, seconds=time.perf_counter() - start,
                          forget=forget_sets(surrogates, region=method.surrogate_region,
                                             choose=method.choose_surrogates, seed=method.seed),
                          surrogates=tuple(surrogates.values()), warp_evidence=evidence,
                          scored=tuple(s.trigger for s in scored))


def _pick_target_from_trigger(model: torch.nn.Module, data: ImageSet, trigger: Trigger,
                              preprocess: Preprocessor, batch: int) -> int:
    """With the trigger known but not the target: the class triggered images of D go to most."""
    preds = predict(model, data.images, preprocess, trigger=trigger, batch_size=batch)
    return int(np.bincount(preds, minlength=data.num_classes).argmax())


def _choose_layers(model: torch.nn.Module, data: ImageSet, chosen: _TriggerChoice, *, method: MethodOptions,
                   preprocess: Preprocessor, weight: float, batch: int,
                   progress: ProgressCallback | None, replay: bool = True) -> _LayerChoice:
    """The layers and lam to edit with: given, or chosen by cross-validation on D."""
    candidates = None
    if method.layers:
        groups = {"given": resolve_layers(model, list(method.layers))}
    else:
        candidates = find_candidates(model, preprocess(data.images[:2]).to(model_device(model)))
        groups = candidates.groups
    if method.lam is not None and len(groups) == 1:
        # lam and layers given: no cross-validation, so the repair is the weight alone and every surrogate is
        # forgotten (the last set is all of them)
        return _LayerChoice(layers=next(iter(groups.values())), lam=float(method.lam), protect=None, selection=None,
                            candidates=candidates, captured={}, boundaries={}, seconds=None, capture_seconds=None,
                            forget=list(chosen.forget.values())[-1])
    if len(data) < method.folds:
        raise DataError(f"cross-validation needs at least {method.folds} edit images; pass --lam and --layers")
    grid = (method.lam,) if method.lam is not None else method.lam_grid
    start = time.perf_counter()
    refit = None
    if method.repair and method.refit_classifier:  # scored in every trial, as _refit_classifier runs it after
        head = classifier_name(model, preprocess(data.images[:2]).to(model_device(model)))
        refit = RefitTrial(head=head, trigger=chosen.trigger, lam=_refit_lam(model, head, data, method),
                           gamma=method.gamma, target_weight=weight)
    selection, capture_seconds, captured, boundaries = _cross_validate(
        model, data, chosen.forget, chosen.target, preprocess, groups, grid, gamma=method.gamma, target_weight=weight,
        copies=method.augment_copies, folds=method.folds, seed=method.seed, flip=method.flip,
        protects=tuple(method.protect_grid) if method.repair else (None,), replay=replay, refit=refit,
        batch_size=batch, progress=progress,
        weights=method.target_weight_grid if method.repair else None,
        rule=method.selection, scored=chosen.scored)
    return _LayerChoice(layers=selection.layers, lam=selection.lam, protect=selection.protect, selection=selection,
                        candidates=candidates, captured=captured, boundaries=boundaries,
                        seconds=time.perf_counter() - start, capture_seconds=capture_seconds,
                        forget=chosen.forget[selection.forget])


def _final_edit(edited: torch.nn.Module, original: torch.nn.Module, data: ImageSet, chosen: _TriggerChoice,
                layers: _LayerChoice, *, method: MethodOptions, preprocess: Preprocessor, weight: float, batch: int,
                progress: ProgressCallback | None, replay: bool = True
                ) -> tuple[dict[str, GramStats], dict[str, torch.Tensor], dict[str, float]]:
    """Edit the chosen layers of ``edited`` shallow to deep; keys of each layer come through those already edited.

    A later layer whose input no earlier edit reaches (a shortcut's conv beside the block's first conv) keeps
    the cross-validation's statistics; one that an earlier edit reaches is captured again, from the cached
    boundary outputs when the cross-validation kept them for every augmented copy (deeper in a chain of blocks,
    from the output of the block before it, computed once from them: :func:`select.walk_to`). Both only with the
    BatchNorm averages kept (re-estimated averages change what later layers receive).

    Returns each layer's statistics, its original weight matrix, and the seconds of capture, solve and bn_stats.
    """
    seconds = {"capture": 0.0, "solve": 0.0, "bn_stats": 0.0}
    w0 = {n: _weight_matrix(original, n) for n in layers.layers}
    final_stats: dict[str, GramStats] = {}
    edits = StageCounter(progress, "edit", len(layers.layers), "layers")
    # per trigger, the boundary outputs a chain's next layer replays from: deeper as its edits go deeper
    walk = dict(layers.boundaries)
    for position, name in enumerate(layers.layers):
        start = time.perf_counter()
        shortcut = replay and method.bn_stats == "keep"
        if position == 0 and name in layers.captured:  # nothing upstream is edited yet: the CV's keys are these keys
            final_stats[name] = layers.captured[name]
        elif shortcut and name in layers.captured and not reads_from(edited, name, layers.layers[:position],
                                                                     preprocess(data.images[:1]).to(model_device(edited))):
            final_stats[name] = layers.captured[name]
        else:
            # one capture per forgotten trigger, on the same augmented clean images (same seed); forget terms add
            captured = StageCounter(progress, "capture", 2 * len(data) * (method.augment_copies + 1) * len(layers.forget),
                                    "images")
            if shortcut:
                for key, cached in walk.items():
                    walk[key] = walk_to(edited, cached, name, np.arange(len(data)), copies=method.augment_copies,
                                        batch_size=max(1, batch // 2))
            final_stats[name] = forget_sum([capture_layer(
                edited, name, augmented_pairs(data.images, data.labels, used, copies=method.augment_copies,
                                              seed=method.seed, flip=method.flip, batch_size=max(1, batch // 2)),
                preprocess, chosen.target, walk.get(id(used)) if shortcut else None, progress=captured)
                for used in layers.forget])
        seconds["capture"] += time.perf_counter() - start
        start = time.perf_counter()
        apply_edit(edited, {name: final_stats[name]}, lam=layers.lam, gamma=method.gamma, target_weight=weight,
                   original={name: w0[name]}, protect=layers.protect)
        seconds["solve"] += time.perf_counter() - start
        if method.bn_stats == "recompute":
            start = time.perf_counter()
            recompute_batchnorm(edited, name, bn_batches(data.images, layers.forget, preprocess))
            seconds["bn_stats"] += time.perf_counter() - start
        edits.advance()
    edited.eval()
    return final_stats, w0, seconds


def _refit_classifier(edited: torch.nn.Module, original: torch.nn.Module, data: ImageSet, chosen: _TriggerChoice,
                      layers: _LayerChoice, *, method: MethodOptions, preprocess: Preprocessor, weight: float,
                      batch: int, seconds: dict[str, float], replay: bool = True) -> str | None:
    """The repair's second pass (engine/repair.py) when the edit sat upstream of the classifier; its name, or None.

    It runs from the cross-validation's boundary outputs when they were kept for every copy (and the BatchNorm
    averages were kept: re-estimated ones change what the layers after the boundary receive).
    """
    if not (method.repair and method.refit_classifier):
        return None
    head = classifier_name(original, preprocess(data.images[:2]).to(model_device(original)))
    if head in layers.layers:  # the edit itself rewrote the classifier against the original outputs
        return None
    start = time.perf_counter()
    pairs = augmented_pairs(data.images, data.labels, chosen.trigger, copies=method.augment_copies, seed=method.seed,
                            flip=method.flip, batch_size=max(1, batch // 2))
    boundary = layers.boundaries.get(id(chosen.trigger)) if replay and method.bn_stats == "keep" else None
    stats = collect_refit_stats(edited, original, head, pairs, preprocess, target=chosen.target, boundary=boundary)
    seconds["capture"] += time.perf_counter() - start
    start = time.perf_counter()
    layer = editable_layer(edited, head)
    where = stats.cc.device
    layer.set_weight_matrix(solve_refit(_weight_matrix(original, head).to(where, torch.float64),
                                        layer.weight_matrix().to(where, torch.float64), stats,
                                        lam=_refit_lam(original, head, data, method),
                                        gamma=method.gamma, target_weight=weight))
    seconds["solve"] += time.perf_counter() - start
    edited.eval()
    return head


def _refit_lam(model: torch.nn.Module, head: str, data: ImageSet, method: MethodOptions) -> float:
    """The re-fit's ridge, the same in the trials and the final re-fit: from the rows the final one reads (one per
    image of D and of each augmented copy) against the classifier's key dimensions."""
    return refit_ridge(method.refit_lam, editable_layer(model, head).key_dim, len(data) * (method.augment_copies + 1))


def _weight_matrix(model: torch.nn.Module, name: str) -> torch.Tensor:
    return editable_layer(model, name).weight_matrix().clone()


def evaluate(model: torch.nn.Module, data: ImageSet, trigger: str | Trigger | None = None,
             target: int | None = None, *, preprocess: Preprocessor | None = None,
             device: str | torch.device | None = None, batch_size: int | None = None,
             progress: ProgressCallback | None = None) -> Metrics:
    """CA, ASR, TA, RA and per-class accuracy of ``model`` on ``data`` (ASR and RA need a trigger).

    ``device``: where to run (``None``: where ``model`` is; elsewhere a copy runs, ``model`` stays put);
    ``batch_size``: images per forward pass (``None``: sized to the device).
    """
    model = as_classifier(model, preprocess=preprocess)
    used = parse_trigger(trigger) if trigger is not None else None
    if target is not None and not 0 <= target < data.num_classes:
        raise ClassMismatchError(f"target class {target} is out of range: 0..{data.num_classes - 1}")
    run_on = resolve_device(device) if device is not None else model_device(model)
    if run_on != model_device(model):
        model = copy.deepcopy(model).to(run_on)
    preprocess = Preprocessor.from_model(model)
    batch = pick_batch_size(batch_size, run_on, preprocess.input_size)
    counter = StageCounter(progress, "evaluation", measured_images(data, trigger=used, target=target), "images")
    return measure(model, data, preprocess, trigger=used, target=target, batch_size=batch, progress=counter)


def inspect_layers(model: torch.nn.Module, *, preprocess: Preprocessor | None = None) -> Candidates:
    """The candidate layer groups the engine would choose from for ``model``."""
    model = as_classifier(model, preprocess=preprocess)
    preprocess = Preprocessor.from_model(model)
    sample = torch.zeros((2,) + tuple(preprocess.input_size))
    return find_candidates(model, sample)
