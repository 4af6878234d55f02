"""Choosing layers and lam by k-fold cross-validation on the edit images themselves (never on test data).

Every (triggers to forget, layer group, lam) is scored on the held-out fold after an edit built from the other
folds; the Gram statistics of a fold are subtracted from the total, so the activations are captured once per
trigger, for every candidate layer in the same pass. Without backdoor knowledge the triggers are surrogates
(several sets of them) and the ASR on the held-out fold is that of every surrogate, the same proxy for every
set. The capture pass also keeps, per group, the output of a boundary module before the group's first layer
(:mod:`.replay`), so that each fold and setting runs only the part of the network the edit can change.
A trial is the model the engine ships. A group's layers are solved one after another, as the final edit solves
them: a layer that reads from one edited before it (a chain: a ViT block's qkv -> proj -> fc1, MobileNetV3's
conv_head -> classifier) gets its keys captured again through the trial's edits, on the other folds' pairs,
replayed from the output of the last block the chain has passed (:func:`walk_to`). After a group upstream of
the classifier, the repair's re-fit of the classifier (:class:`RefitTrial`) runs too, on the other folds' images
of D.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..constants import DEFAULT_SELECTION, SELECTION_BAR_MARGIN
from ..data import ImageSet, Preprocessor
from ..devices import model_device, stats_device
from ..progress import ProgressCallback, StageCounter
from ..triggers import Trigger
from .capture import capture_activations
from .classifier import logits_of
from .edit import GramStats, PairBatch, apply_edit, augmented_pairs, collect_stats, forget_sum
from .layers import editable_layer
from .metrics import natural_confusion
from .repair import collect_refit_stats, solve_refit
from .replay import CachedBoundary, Replay, deeper_boundaries, plan_replay, reads_from

__all__ = ["Selection", "RefitTrial", "capture_layer", "walk_to"]

# The boundary outputs of every augmented copy are also kept (for the final edit's later layers) when they
# fit in this many bytes; above it only those of D itself (for the cross-validation's predictions).
KEEP_COPIES_BYTES = 1 << 30


@dataclass(frozen=True)
class RefitTrial:
    """The repair's second pass (:mod:`.repair`) as the final edit runs it, so that every trial scores it too.

    An edit upstream of ``head`` is followed by the classifier's re-fit; a trial that left it out would score a
    model the engine never ships (on a ViT the entry edit alone keeps the backdoor, the re-fit removes it).
    """

    head: str  # the classifier re-fitted after a group that does not contain it
    trigger: Trigger  # whose pairs the re-fit reads
    lam: float
    gamma: float
    target_weight: float


# How describe() names a rule other than the plain count ("score").
_RULE_WORDS = {"soft": " (scored on predicted probabilities)", "bar": " (the forgetting bar first)"}


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
    forget: str = "given"  # the set of triggers forgotten: "given", or surrogates such as "patch+region+full"
    rule: str = DEFAULT_SELECTION  # how the rows were ranked (_pick)

    def describe(self) -> str:
        best = next(r for r in self.table if r["group"] == self.group and r["lam"] == self.lam
                    and r.get("protect") == self.protect and r.get("forget", "given") == self.forget
                    and r.get("target_weight", self.target_weight) == self.target_weight)
        protected = f", target keys protected to {self.protect:g} of their energy" if self.protect else ""
        forgets = "" if self.forget == "given" else f", forgetting the {self.forget} surrogate(s)"
        asr = "ASR" if self.forget == "given" else "surrogate ASR"
        ranked = _RULE_WORDS.get(self.rule, "")
        return (f"{self.folds}-fold cross-validation on the edit images{ranked} chose {self.group} "
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


def _held_out_metrics(clean_pred: np.ndarray, clean_prob: np.ndarray, probe_pred: np.ndarray, probe_prob: np.ndarray,
                      labels: np.ndarray, target: int) -> dict[str, float]:
    """A setting's held-out CA, TA, ASR (each image counted 0 or 1) and their ``soft`` twins (each image counted by
    its predicted probability of the class counted), with a score of each kind (:func:`_score`).

    ``clean_*``: the prediction of every image of D, and its probability of the image's true class; ``probe_*``: per
    scored trigger, the prediction of the triggered copy of every image of D, and its probability of the target.
    With 10 target images in D a fold's TA moves in steps of 10 pt; the probabilities also see a target image
    whose margin shrank without crossing, and a triggered one pulled toward the target without reaching it.
    """
    is_target, others = labels == target, labels != target
    ca, ca_p = float((clean_pred == labels).mean()), float(clean_prob.mean())
    ta = float((clean_pred[is_target] == target).mean()) if is_target.any() else 0.0
    ta_p = float(clean_prob[is_target].mean()) if is_target.any() else 0.0
    asr = float((probe_pred[:, others] == target).mean()) if others.any() else 0.0
    asr_p = float(probe_prob[:, others].mean()) if others.any() else 0.0
    return {"ca": ca, "ta": ta, "asr": asr, "score": _score(ca, ta, asr),
            "ca_p": ca_p, "ta_p": ta_p, "asr_p": asr_p, "soft_score": _score(ca_p, ta_p, asr_p)}


def _pick(table: list[dict[str, Any]], rule: str, natural: float) -> dict[str, Any]:
    """The chosen row; among equals the first (the table's order: first forget set, shallow group, small lam).

    ``score``: the best :func:`_score`. ``soft``: the best :func:`_score` of the held-out probabilities. ``bar``:
    the forgetting bar first, as the issue's bench judges a cell (held-out ASR within D's own natural confusion +
    :data:`SELECTION_BAR_MARGIN`), then the most CA + TA/2 kept; where no setting reaches the bar, the lowest ASR."""
    if rule == "score":
        return max(table, key=lambda r: r["score"])
    if rule == "soft":
        return max(table, key=lambda r: r["soft_score"])
    within = [r for r in table if r["asr"] <= natural + SELECTION_BAR_MARGIN + 1e-9]
    if within:
        return max(within, key=lambda r: (r["ca"] + 0.5 * r["ta"], r["score"]))
    return min(table, key=lambda r: (r["asr"], -r["score"]))


def _cross_validate(model: torch.nn.Module, data: ImageSet, forget: dict[str, tuple[Trigger, ...]], target: int,
                    preprocess: Preprocessor, groups: dict[str, list[str]], lams: tuple[float, ...], *,
                    gamma: float, target_weight: float, copies: int, folds: int, seed: int,
                    flip: bool, protects: tuple[float | None, ...] = (None,), replay: bool = True,
                    refit: RefitTrial | None = None, batch_size: int = 512, progress: ProgressCallback | None = None,
                    weights: tuple[float, ...] | None = None, rule: str = DEFAULT_SELECTION,
                    scored: tuple[Trigger, ...] = ()
                    ) -> tuple[Selection, float, dict[str, GramStats], dict[int, CachedBoundary]]:
    """Leave-one-fold-out over (forget set, group, lam, protect, weight); a fold's statistics are subtracted from the
    total.

    ``forget`` names the sets of triggers an edit may forget together (one set, ``{"given": (trigger,)}``, with
    backdoor knowledge). The held-out ASR is the mean over every trigger of every set, whichever set the edit
    forgot. Also returns the seconds spent capturing, the chosen set's statistics over all of D, which the
    final edit reuses, and for the chosen group the cached boundary outputs of every augmented copy, per
    trigger (``id(trigger)``), when they were kept (see :data:`KEEP_COPIES_BYTES`). ``replay=False`` runs the
    whole network for every prediction (the reference). ``refit``: the classifier's re-fit that follows an edit
    of a group without it, run in each trial on the other folds' pairs. ``batch_size``: images per forward pass.
    ``weights``: the target-class weights tried (``None``: ``target_weight`` alone); ``rule``: how the rows are
    ranked (:func:`_pick`). ``scored``: triggers never forgotten whose held-out success is then the ASR (no-BDK's
    held-out surrogates); their pairs are captured like the others'.
    """
    weights = tuple(weights) if weights else (target_weight,)
    fold_of = _stratified_folds(data.labels, folds, seed)
    names = list(dict.fromkeys(n for group in groups.values() for n in group))
    forgettable = [t for members in forget.values() for t in members]
    triggers = list({id(t): t for t in (*forgettable, *scored)}.values())
    # the probes whose held-out success is the ASR (the only ones a trial predicts): the scored triggers where there
    # are any, else every trigger
    scored_ids = {id(t) for t in scored}
    asr_rows = [i for i, t in enumerate(triggers) if not scored or id(t) in scored_ids]
    probes = [t.apply(data.images) for t in triggers]
    start = time.perf_counter()
    device = model_device(model)
    plans: dict[str, Replay] = {}
    if replay:
        replay_sample = preprocess(np.concatenate([data.images[:2], probes[0][:2]])).to(device)
        plans = {g: p for g, layer_names in groups.items()
                 if (p := plan_replay(model, layer_names, replay_sample)) is not None}
    boundaries = list(dict.fromkeys(p.boundary for p in plans.values()))
    per_copy = (1 + len(triggers)) * len(data) * sum(p.bytes_per_image()
                                                     for p in {p.boundary: p for p in plans.values()}.values())
    keep_copies = copies + 1 if per_copy * (copies + 1) <= KEEP_COPIES_BYTES else 1
    # per boundary and kept copy: the clean rows (from the first trigger's pass: every trigger's pass sees the
    # same augmented clean images) and, per trigger, the triggered rows of every batch, in the order of D
    kept_clean = {b: [[] for _ in range(keep_copies)] for b in boundaries}
    kept_triggered = {(b, i): [[] for _ in range(keep_copies)] for b in boundaries for i in range(len(triggers))}
    captured = StageCounter(progress, "capture", 2 * len(data) * (copies + 1) * len(triggers), "images")
    by_trigger = {}
    with capture_activations(model, boundaries, retain_input=False, retain_output=True) as keep:
        for i, trigger in enumerate(triggers):
            def run(batch: PairBatch, i: int = i) -> object:
                try:
                    return model(torch.cat([preprocess(batch.clean), preprocess(batch.triggered)]).to(device))
                finally:  # every boundary precedes the layers whose capture ends the pass early
                    if batch.copy < keep_copies:
                        n = len(batch.labels)
                        for b in boundaries:
                            out = keep[b].output
                            if i == 0:
                                kept_clean[b][batch.copy].append(out[:n])
                            kept_triggered[b, i][batch.copy].append(out[n:])

            # the same seed gives every trigger the same augmented clean images
            pairs = augmented_pairs(data.images, data.labels, trigger, copies=copies, seed=seed, flip=flip,
                                    batch_size=max(1, batch_size // 2))
            by_trigger[id(trigger)] = collect_stats(model, names, pairs, preprocess, target=target, folds=fold_of,
                                                    num_folds=folds, run=run, progress=captured)
    sample = preprocess(data.images[:1]).to(device)
    chained = {group: [n for p, n in enumerate(layer_names) if p and reads_from(model, n, layer_names[:p], sample)]
               for group, layer_names in groups.items()}
    # per group, per trigger: its replay plan, the boundary outputs, and deeper boundaries for a chain's later layers
    deeper = {group: deeper_boundaries(model, plan, chained[group], replay_sample) if chained[group] else {}
              for group, plan in plans.items()}
    cached = {group: {id(t): CachedBoundary(plan, [torch.cat(rows) for rows in kept_clean[plan.boundary]],
                                            [torch.cat(rows) for rows in kept_triggered[plan.boundary, i]],
                                            deeper[group])
                      for i, t in enumerate(triggers)}
              for group, plan in plans.items()}
    capture_seconds = time.perf_counter() - start
    stats = {name: {n: [forget_sum([by_trigger[id(t)][n][f] for t in members]) for f in range(folds)] for n in names}
             for name, members in forget.items()}
    totals = {name: {n: sum(s[1:], s[0]) for n, s in per_layer.items()} for name, per_layer in stats.items()}
    chain_copies = {n: _chain_copies(editable_layer(model, n).key_dim, totals[next(iter(forget))][n].rows,
                                     copies=copies, kept=keep_copies, folds=folds)
                    for members in chained.values() for n in members}
    # a walked block's outputs serve every later layer of the chain: as many copies as the most any of them reads
    walk_copies = {group: max((chain_copies[n] for n in members), default=0) for group, members in chained.items()}
    trial = copy.deepcopy(model)
    every_row = np.arange(len(data))
    table = []
    # the re-fit reads the pairs of its own trigger (one of those captured); the original model's side of its
    # sums is the same in every trial, so it is computed once
    refit_probe = next((p for t, p in zip(triggers, probes) if refit is not None and t is refit.trigger), None)
    refit_original = (_original_keys(model, refit.head, data, preprocess, batch_size)
                      if refit_probe is not None and any(refit.head not in g for g in groups.values()) else None)
    trials = StageCounter(progress, "selection",
                          len(forget) * len(groups) * len(lams) * len(protects) * len(weights) * folds, "trial edits")
    for forget_name in forget:
        for group, layer_names in groups.items():
            boundary = cached.get(group)
            # Each trial edit rewrites every layer of the group from its original weights: restoring the whole
            # model once per group is enough (a state_dict copy per fold costs more than a small model's solve).
            trial.load_state_dict(model.state_dict())
            w0 = {n: editable_layer(model, n).weight_matrix() for n in layer_names}
            refits = refit_probe is not None and refit.head not in layer_names
            for lam, protect, weight in itertools.product(lams, protects, weights):
                trial_refit = dataclasses.replace(refit, target_weight=weight) if refits else None
                clean_pred = np.empty(len(data), np.int64)
                probe_pred = np.empty((len(asr_rows), len(data)), np.int64)
                clean_prob = np.empty(len(data), np.float32)  # the probability of the true class
                probe_prob = np.empty((len(asr_rows), len(data)), np.float32)  # the probability of the target
                for fold in range(folds):
                    held = np.flatnonzero(fold_of == fold)
                    if len(held) == 0:
                        continue
                    train = np.flatnonzero(fold_of != fold)
                    # per trigger, the boundary the chain's next layer replays from: deeper as its edits go deeper;
                    # the re-fit and the held-out predictions then replay from the deepest one reached (every row
                    # of D is walked, the held-out fold's too)
                    walk = dict(boundary) if boundary else {}
                    for n in layer_names:  # shallow to deep, as the final edit solves them
                        if n in chained[group]:  # its keys come through the layers of the group edited before it
                            for t in forget[forget_name] if boundary else ():
                                walk[id(t)] = walk_to(trial, walk[id(t)], n, every_row, copies=walk_copies[group],
                                                      batch_size=max(1, batch_size // 2))
                            layer_stats = forget_sum([capture_layer(
                                trial, n, _training_pairs(data, t, train, copies=chain_copies[n], seed=seed, flip=flip,
                                                          batch_size=max(1, batch_size // 2),
                                                          cached=boundary is not None),
                                preprocess, target, walk.get(id(t)))
                                for t in forget[forget_name]])
                        else:
                            layer_stats = totals[forget_name][n] - stats[forget_name][n][fold]
                        apply_edit(trial, {n: layer_stats}, lam=lam, gamma=gamma, target_weight=weight,
                                   protect=protect, original=w0)
                    if refits:
                        _refit_in_trial(trial, model, trial_refit, data, refit_probe, refit_original, train, target,
                                        preprocess, walk[id(refit.trigger)] if boundary else None,
                                        max(1, batch_size // 2))
                    if boundary is not None:
                        first = walk[id(triggers[0])]
                        clean_pred[held], clean_prob[held] = _predict_replayed(
                            trial, first.plan, first.clean[0][held], data.labels[held], batch_size)
                        for row, i in enumerate(asr_rows):
                            at = walk[id(triggers[i])]
                            probe_pred[row, held], probe_prob[row, held] = _predict_replayed(
                                trial, at.plan, at.triggered[0][held], target, batch_size)
                    else:
                        clean_pred[held], clean_prob[held] = _predict_full(trial, data.images[held],
                                                                           data.labels[held], preprocess, batch_size)
                        for row, i in enumerate(asr_rows):
                            probe_pred[row, held], probe_prob[row, held] = _predict_full(
                                trial, probes[i][held], target, preprocess, batch_size)
                    trials.advance()
                table.append({"forget": forget_name, "group": group, "lam": lam, "protect": protect,
                              "target_weight": weight,
                              **_held_out_metrics(clean_pred, clean_prob, probe_pred, probe_prob, data.labels, target)})
    # the bar's base: the clean non-target images of D the model already sends to the target
    natural = natural_confusion(model, data, preprocess, target, batch_size=batch_size) if rule == "bar" else 0.0
    best = _pick(table, rule, natural)
    selection = Selection(group=str(best["group"]), layers=groups[str(best["group"])], lam=float(best["lam"]),
                          target_weight=float(best["target_weight"]), folds=folds, table=table,
                          protect=best["protect"], forget=str(best["forget"]), rule=rule)
    chosen = {key: c for key, c in cached.get(selection.group, {}).items() if len(c.clean) == copies + 1}
    return selection, capture_seconds, totals[selection.forget], chosen


def capture_layer(model: torch.nn.Module, name: str, pairs: Iterator[PairBatch], preprocess: Preprocessor,
                  target: int, boundary: CachedBoundary | None, *, progress: StageCounter | None = None) -> GramStats:
    """One layer's statistics over the pairs, run from the cached boundary outputs when there are any."""
    if boundary is None:
        return collect_stats(model, [name], pairs, preprocess, target=target, progress=progress)[name][0]
    with boundary.plan.installed(model) as run:
        return collect_stats(model, [name], pairs, preprocess, target=target, progress=progress,
                             run=lambda batch: run(boundary.rows(batch)))[name][0]


def walk_to(model: torch.nn.Module, cached: CachedBoundary, layer: str, rows: np.ndarray, *, copies: int,
            batch_size: int) -> CachedBoundary:
    """The boundary outputs ``layer`` replays from in ``model``, edited up to the layers before it.

    ``cached``: the boundary outputs the chain has reached so far, in ``model``. Where ``layer`` has a deeper
    boundary (``cached.deeper``: a ViT block's output, for the next block's layers) that boundary's outputs are
    computed once from ``cached``, for the images ``rows`` of D in each of its first ``copies`` + 1 copies (the
    other rows stay NaN), so every later layer of the chain replays one block instead of all blocks from the
    group's first boundary.
    """
    plan = cached.deeper.get(layer)
    if plan is None or plan.boundary == cached.plan.boundary:
        return cached
    name = plan.boundary
    clean, triggered = [], []
    with torch.no_grad(), cached.plan.installed(model) as run, capture_activations(
            model, [name], retain_input=False, retain_output=True, stop=True) as trace:
        for copy_index in range(copies + 1):
            sides = None
            for idx in np.array_split(rows, max(1, -(-len(rows) // batch_size))):
                index = torch.as_tensor(idx, device=cached.clean[copy_index].device)
                trace.call(run, torch.cat([cached.clean[copy_index][index], cached.triggered[copy_index][index]]))
                out = trace[name].output
                if sides is None:
                    sides = [out.new_full((len(cached.clean[copy_index]), *out.shape[1:]), float("nan"))
                             for _ in range(2)]
                sides[0][index], sides[1][index] = out[:len(idx)], out[len(idx):]
            clean.append(sides[0])
            triggered.append(sides[1])
    return CachedBoundary(plan, clean, triggered, cached.deeper)


def _chain_copies(key_dim: int, rows: int, *, copies: int, kept: int, folds: int) -> int:
    """How many augmented copies a trial reads to capture a chained layer's keys again (``rows``: that layer's rows
    over D and every copy).

    D alone where the training folds' rows of D span the layer's keys (a ViT block reads tokens: many rows per
    image); else every copy whose boundary outputs were kept, as the final edit reads them. Below that the
    trial's solve is settled by the ridge in the directions D leaves out, the final edit's by the copies, and the
    folds choose badly (measured on the bench: MobileNetV3's and EfficientNet's classifier, one row per image,
    docs/METHOD.md). Every copy costs a trial as much as D itself again.
    """
    rows_of_d = rows / (copies + 1) * (folds - 1) / folds
    return 0 if rows_of_d >= key_dim else kept - 1


def _training_pairs(data: ImageSet, trigger: Trigger, train: np.ndarray, *, copies: int, seed: int, flip: bool,
                    batch_size: int, cached: bool) -> Iterator[PairBatch]:
    """The pairs of the training folds' images ``train``: D and its first ``copies`` augmented copies, the ones the
    capture pass made (the same seed gives the same copies).

    ``cached``: the boundary outputs of these copies are kept, so a batch only has to say which rows it is (its
    ``source`` and ``copy``); its images are D's, unused. Otherwise the copies are made again.
    """
    chunks = max(1, -(-len(train) // batch_size))
    if cached:
        for copy_index in range(copies + 1):
            for idx in np.array_split(train, chunks):
                yield PairBatch(data.images[idx], data.images[idx], data.labels[idx], idx, copy_index)
        return
    for batch in augmented_pairs(data.images, data.labels, trigger, copies=copies, seed=seed, flip=flip,
                                 batch_size=batch_size):
        keep = np.isin(batch.source, train)
        if keep.any():
            yield PairBatch(batch.clean[keep], batch.triggered[keep], batch.labels[keep], batch.source[keep],
                            batch.copy)


def _refit_in_trial(trial: torch.nn.Module, model: torch.nn.Module, refit: RefitTrial, data: ImageSet,
                    probe: np.ndarray, original: tuple[torch.Tensor, torch.Tensor], train: np.ndarray, target: int,
                    preprocess: Preprocessor, boundary: CachedBoundary | None, batch_size: int) -> None:
    """Re-fit ``trial``'s classifier on the training folds' images of D and their triggered twins ``probe``.

    ``original``: the classifier's weight matrix and its keys of D's clean images in ``model``
    (:func:`_original_keys`). The final re-fit also reads the augmented copies. A trial reads D alone, from the
    boundary's outputs where there are some: two passes of the layers after the boundary per trial, whatever
    the model's size (over every copy, the trials would cost several times the forward-pass floor on a 224-px
    network), and the same result with and without replay.
    """
    w0, keys = original
    pairs = (PairBatch(data.images[idx], probe[idx], data.labels[idx], idx, 0)
             for idx in np.array_split(train, -(-len(train) // batch_size)))
    stats = collect_refit_stats(trial, model, refit.head, pairs, preprocess, target=target, boundary=boundary,
                                original_keys=keys)
    w = solve_refit(w0, w0, stats, lam=refit.lam, gamma=refit.gamma, target_weight=refit.target_weight)
    editable_layer(trial, refit.head).set_weight_matrix(w)


@torch.inference_mode()
def _original_keys(model: torch.nn.Module, head: str, data: ImageSet, preprocess: Preprocessor,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``head``'s weight matrix and its keys of every clean image of D, ``(len(D), rows per image, key dim)``, in
    float64 where the statistics accumulate: the original model's side of every trial's re-fit."""
    model.eval()
    layer = editable_layer(model, head)
    where = stats_device(model_device(model))
    keys = []
    with capture_activations(model, [head], stop=True) as trace:
        for start in range(0, len(data), batch_size):
            images = data.images[start:start + batch_size]
            trace.run(preprocess(images).to(model_device(model)))
            keys.append(layer.keys(trace[head].input.to(where, torch.float64)).reshape(len(images), -1,
                                                                                      layer.key_dim))
    return layer.weight_matrix().to(where, torch.float64), torch.cat(keys)


@torch.inference_mode()
def _predict_replayed(model: torch.nn.Module, plan: Replay, cached: torch.Tensor, of: np.ndarray | int,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes from the boundary outputs ``cached`` (only the layers after the boundary run), and the
    predicted probability of the class ``of`` (one per row, or one class for all)."""
    model.eval()
    with plan.installed(model) as run:
        return _outcomes([logits_of(run(cached[start:start + batch_size]))
                          for start in range(0, len(cached), batch_size)], of)


@torch.inference_mode()
def _predict_full(model: torch.nn.Module, images: np.ndarray, of: np.ndarray | int, preprocess: Preprocessor,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_predict_replayed`, the whole network run on ``images`` (no replay)."""
    model.eval()
    device = model_device(model)
    return _outcomes([logits_of(model(preprocess(images[start:start + batch_size]).to(device)))
                      for start in range(0, len(images), batch_size)], of)


def _outcomes(logits: list[torch.Tensor], of: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """The argmax of the logits (the counted metrics) and the softmax probability of the class ``of`` (the
    ``soft`` rule's)."""
    if not logits:
        return np.array([], np.int64), np.array([], np.float32)
    joined = torch.cat(logits).float()
    probs = torch.softmax(joined, 1)
    column = torch.as_tensor(np.broadcast_to(of, (len(joined),)).copy(), device=probs.device).long()
    return joined.argmax(1).cpu().numpy(), probs.gather(1, column[:, None])[:, 0].cpu().numpy()
