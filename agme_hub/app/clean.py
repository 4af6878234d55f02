"""The product's pipeline: SOURCE -> cleaned, documented (and maybe published) model folder.

``run_clean(source, options)`` is what ``agme clean``, ``agme batch`` and scripts call. It loads the
model, splits the data, measures before, cleans with :func:`agme_hub.engine.clean`, measures after,
writes the folder atomically (weights, config, report, card) and pushes it in one commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import safetensors
import timm
import torch

from .._version import __version__
from ..constants import CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from ..data import ImageSet, Preprocessor, balanced_indices, load_images, load_paired_folders, split_edit_eval
from ..devices import pick_batch_size, resolve_device
from ..engine import clean, inspect_layers
from ..engine.layers import resolve_layers
from ..engine.metrics import measure, measured_images
from ..errors import ClassMismatchError, DataError, UsageError
from ..hub.card import write_card
from ..hub.checkpoint import (atomic_output_dir, build_model, describe_format, label_names, load_model, model_config,
                              model_format, read_config, save_model, sha256_file)
from ..hub.outputs import check_output_dir, check_output_overlap, check_output_writable, output_files
from ..hub.push import push_folder
from ..hub.sources import ResolvedSource, resolve_source
from ..hub.transformers_format import PROCESSOR_CONFIG_NAME, build_transformers_model
from ..options import CleanOptions
from ..progress import ProgressCallback, StageCounter
from ..report import (CleanReport, DataRecord, Evaluation, MethodRecord, MetricValues, PlannedPush, Provenance,
                      PushRecord, SourceInfo, TargetRecord, TriggerRecord)
from ..trigger_forms import PairedTrigger
from ..surrogate_triggers import DeltaTrigger, MaskTrigger
from ..triggers import Trigger, parse_trigger

__all__ = ["run_clean", "push_output", "inspect_source", "evaluate_source",
           "resolve_target", "default_output_dir", "library_versions", "SURROGATE_DIR", "NO_EVIDENCE_NOTE",
           "Reporter"]

SURROGATE_DIR = "surrogate_trigger"
# What the report says when neither trigger nor target was given and detection found no outlier.
NO_EVIDENCE_NOTE = "no edit: detection found no evidence of a backdoor, so the weights were left unchanged"

Reporter = Callable[[str], None]  # receives one line per stage ("capture", ...) for progress display


def library_versions() -> dict[str, str]:
    versions = {"agme": __version__, "torch": torch.__version__, "timm": timm.__version__,
                "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__}
    transformers = sys.modules.get("transformers")  # recorded when a transformers model was loaded
    if transformers is not None:
        versions["transformers"] = transformers.__version__
    return versions


def resolve_target(target: str | int | None, names: list[str]) -> int | None:
    """A class index or a label name -> class index."""
    if target is None:
        return None
    text = str(target)
    if text in names:
        return names.index(text)
    try:
        index = int(text)
    except ValueError:
        raise ClassMismatchError(f"target {text!r} is neither a class index nor a label name "
                                 f"({', '.join(names[:10])})") from None
    if not 0 <= index < len(names):
        raise ClassMismatchError(f"target class {index} is out of range: the model has {len(names)} classes "
                                 f"(0..{len(names) - 1})")
    return index


def default_output_dir(resolved: ResolvedSource) -> Path:
    name = resolved.repo_id.split("/")[-1] if resolved.repo_id else Path(resolved.local_dir).name
    return Path.cwd() / f"{name}-agme"


def _check_output(out: Path, options: CleanOptions, *, source_dir: str | os.PathLike[str] | None) -> None:
    """Everything about ``--out`` that can fail, checked before any download or model run."""
    check_output_overlap(out, {"source model": source_dir, "data": options.data, "evaluation data": options.eval_data,
                               "trigger file": options.trigger, "triggered data": options.triggered_data})
    check_output_writable(out)
    check_output_dir(out, yes=options.yes)


def _check_classes(edit_set: ImageSet, eval_set: ImageSet, target: int | None, has_trigger: bool) -> None:
    """Refuse data from which the backdoor cannot be removed or measured: one class only."""
    present = np.unique(np.concatenate([edit_set.labels, eval_set.labels]))
    if len(present) < 2:
        only = edit_set.label_names[int(present[0])]
        raise DataError(f"--data holds images of one class only ({only!r}); agme needs clean images of several "
                        "classes to edit the model and to measure the attack success")
    if has_trigger and target is not None and not (eval_set.labels != target).any():
        raise DataError("the evaluation images are all of the target class, so the attack success cannot be "
                        "measured; pass --eval-data with images of other classes")


def _load_data(options: CleanOptions, label_names: list[str]) -> tuple[ImageSet, ImageSet, str, PairedTrigger | None]:
    """The edit images, the evaluation images, what the latter are, and the trigger of ``--triggered-data``.

    The paired trigger holds the twins of all of ``--data``: the edit uses those of the edit images, and the
    attack success is measured on the held-out pairs (``--eval-data`` is refused with it: no twins).
    """
    paired = None
    if options.triggered_data:
        data, twins = load_paired_folders(options.data, options.triggered_data, label_names=label_names)
        paired = PairedTrigger.from_pairs(data.images, twins, source=options.triggered_data)
    else:
        data = load_images(options.data, label_names=label_names)
    if options.eval_data:
        edit = data.subset(balanced_indices(data.labels, options.per_class, seed=options.seed), f"{options.data}")
        evaluation = load_images(options.eval_data, label_names=label_names)
        if options.eval_per_class:
            evaluation = evaluation.subset(balanced_indices(evaluation.labels, options.eval_per_class,
                                                            seed=options.seed + 1))
        return edit, evaluation, f"{options.eval_data} ({len(evaluation)} images)", paired
    edit, evaluation = split_edit_eval(data, options.per_class, seed=options.seed,
                                       eval_per_class=options.eval_per_class)
    return edit, evaluation, f"held-out part of {options.data} (not used for editing)", paired


def run_clean(source: str, options: CleanOptions, *, report: Reporter | None = None,
              endpoint: str | None = None, progress: ProgressCallback | None = None) -> CleanReport:
    """Clean the model at ``source`` as ``options`` say; returns the report (also written as agme_report.json).

    Steps: resolve the source, load model and data, clean (:func:`agme_hub.engine.clean`), measure before
    and after on held-out images, write the folder atomically, push. The model runs on ``options.device``
    (checked before anything is downloaded or written); ``progress`` receives each stage's counts.

    Raises:
        AgmeError: any input, model, Hub or output problem, with a one-line message.
    """
    say = report or (lambda line: None)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    if not options.data:
        raise UsageError("--data is required: an image folder, an .npz or a built-in dataset name")
    trigger: Trigger | None = parse_trigger(options.trigger) if options.trigger is not None else None
    known = trigger is not None or bool(options.triggered_data)  # a paired trigger is built with the data, below
    device = resolve_device(options.device)  # a missing GPU fails now, before any download or output
    local_source = Path(source.removeprefix("local-dir:")).expanduser()
    if options.out and not options.dry_run:  # before any download: a bad --out must not cost a pull
        _check_output(Path(options.out).expanduser().resolve(), options,
                      source_dir=local_source if local_source.exists() else None)
    say("resolving the source")
    resolved = resolve_source(source, revision=options.revision, token=options.token, offline=options.offline,
                              allow_pickle=options.allow_pickle, dry_run=options.dry_run, endpoint=endpoint)
    config = model_config(resolved.local_dir)  # timm config, or a summary of a transformers one
    out = Path(options.out).expanduser().resolve() if options.out else default_output_dir(resolved)
    if not options.dry_run:
        _check_output(out, options, source_dir=resolved.local_dir)
    names = label_names(config)
    target = resolve_target(options.target, names)
    base = CleanReport(
        agme_version=__version__, status="running", source=source, source_kind=resolved.kind,
        revision=resolved.revision, base_model=resolved.repo_id, license=resolved.license,
        architecture=config.get("architecture"), num_classes=len(names), label_names=names,
        format=config.get("format", "timm"), mode="bdk" if known else "no-bdk",
        trigger=TriggerRecord(spec=trigger.spec if trigger else None, kind="given" if known else None),
        options={k: (list(v) if isinstance(v, tuple) else v) for k, v in options.public_dict().items()},
        output_dir=str(out), command=shlex.join(["agme", *options.to_cli_args(source)]),
    )
    if options.dry_run:
        return _dry_run_report(base, resolved, options)

    say(f"loading the model onto {device}")
    model = load_model(resolved.local_dir, allow_pickle=options.allow_pickle).to(device)
    edit_set, eval_set, eval_what, paired = _load_data(options, names)
    if paired is not None:
        trigger = paired
        base = base.replace(trigger=TriggerRecord(spec=paired.spec, kind="given"))
    _check_classes(edit_set, eval_set, target, trigger is not None)
    if trigger is not None:  # a trigger that does not fit these images fails now, not after the clean
        trigger.apply(edit_set.images[:1])
    timing["load"] = time.perf_counter() - start
    preprocess = Preprocessor.from_model(model)

    say(f"cleaning with {len(edit_set)} images")
    result = clean(model, edit_set, trigger=trigger, target=target, method=options.method, device=device,
                   batch_size=options.batch_size, progress=progress)
    timing["capture"] = result.timings.total_capture
    timing["edit"] = result.timings.total_edit
    timing["inversion"] = result.timings.inversion or 0.0
    timing["repair"] = 0.0  # the repair is part of the same solve (a weighted preserve term)

    say("evaluating before and after")
    t0 = time.perf_counter()
    measured_trigger = trigger if trigger is not None else result.trigger
    passes = (2 + int(result.unrepaired_model is not None)) * measured_images(eval_set, trigger=measured_trigger,
                                                                               target=result.target)
    evaluated = StageCounter(progress, "evaluation", passes, "images")
    scored = dict(preprocess=preprocess, trigger=measured_trigger, target=result.target, batch_size=result.batch_size,
                  progress=evaluated)
    before = measure(model, eval_set, **scored)
    after = measure(result.model, eval_set, **scored)
    without_repair = None
    if result.unrepaired_model is not None:
        without_repair = measure(result.unrepaired_model, eval_set, **scored)
    timing["eval"] = time.perf_counter() - t0

    detection = result.detection
    record = base.replace(
        status="complete",
        target=TargetRecord(index=result.target, label=names[result.target] if result.target is not None else None,
                            detected=result.target_detected,
                            anomaly_index=round(detection.anomaly_index, 3) if detection else None,
                            ranking=[(c, round(norm, 2)) for c, norm, _ in detection.ranking] if detection else None,
                            evidence=detection.flagged if detection else None),
        n_edit_images=len(edit_set), per_class=options.per_class,
        data=DataRecord(edit=options.data, eval=eval_what, n_eval_images=len(eval_set)),
        method=MethodRecord(lam=result.lam if result.edited else None, gamma=result.gamma, layers=list(result.layers),
                            repair=options.repair,
                            target_weight=result.target_weight, refitted=result.refitted or "",
                            augment_copies=result.augment_copies,
                            bn_stats=result.bn_stats, seed=result.seed,
                            selection=(result.selection.describe() if result.selection else "given by the user")
                            if result.edited else NO_EVIDENCE_NOTE),
        before=MetricValues.of(before), after=MetricValues.of(after),
        after_without_repair=MetricValues.of(without_repair) if without_repair else None,
        asr_measured_with=("triggered twins of the held-out images (--triggered-data)" if paired is not None
                           else "given trigger" if trigger is not None
                           else "surrogate trigger (reconstructed, not the real one)"),
    )
    if trigger is None:
        record = record.replace(trigger=TriggerRecord(spec=result.trigger.spec, kind="surrogate"))

    say("saving")
    t0 = time.perf_counter()
    source_ref = resolved.ref if resolved.kind == "hub" else str(resolved.local_dir)
    metadata = {"agme.version": __version__, "agme.source": source_ref,
                "agme.method": json.dumps(record.method.to_json(), sort_keys=True),
                "agme.parameters": json.dumps({k: record.options[k] for k in
                                               ("trigger", "target", "per_class", "seed")}, sort_keys=True)}
    with atomic_output_dir(out, overwrite=True) as tmp:
        save_model(result.model.cpu(), tmp, label_names=names, pretrained_cfg=config.get("pretrained_cfg"),
                   model_args=config.get("model_args"), metadata=metadata)
        if config.get("format") != "transformers":  # save_pretrained writes the whole transformers config
            _keep_config(tmp / CONFIG_NAME, config)
        saved = [t.save(tmp / SURROGATE_DIR).replace(str(tmp), str(out))
                 for t in (result.forgotten if trigger is None else ()) if isinstance(t, (MaskTrigger, DeltaTrigger))]
        if saved:  # every surrogate the edit forgot, each as a spec that reads its saved files back
            record = record.replace(trigger=dataclasses.replace(record.trigger, files="; ".join(saved)))
        timing["save"] = time.perf_counter() - t0
        timing["total"] = time.perf_counter() - start
        record = record.replace(
            timing={k: round(v, 3) for k, v in timing.items()},
            runtime={"device": result.device, "batch_size": result.batch_size},
            provenance=Provenance(weights_sha256=sha256_file(tmp / WEIGHTS_NAME), versions=library_versions()))
        record.write(tmp)
        write_card(tmp, record, overwrite=True)
        # Last: the list of what agme wrote, which makes this folder replaceable without --yes (hub/outputs.py).
        record = record.replace(output_files=output_files(tmp))
        record.write(tmp)
    if options.push_to:
        say(f"pushing to {options.push_to}")
        record = push_output(out, options.push_to, token=options.token, private=options.private,
                             create_pr=options.create_pr, endpoint=endpoint)
    return record


def _keep_config(path: Path, source_config: dict[str, Any]) -> None:
    """Carry over what the source's config.json said that timm does not regenerate (e.g. label_descriptions)."""
    written = json.loads(path.read_text())
    for key, value in source_config.items():
        written.setdefault(key, value)
    path.write_text(json.dumps(written, indent=2) + "\n")


def push_output(folder: str | os.PathLike[str], repo_id: str, *, token: str | None = None, private: bool = False,
                create_pr: bool = False, endpoint: str | None = None) -> CleanReport:
    """Push an output folder in one commit and record the push in its report (locally)."""
    folder = Path(folder)
    has_report = (folder / REPORT_NAME).is_file()
    record = CleanReport.load(folder) if has_report else CleanReport()
    result = push_folder(folder, repo_id, token=token, private=private, create_pr=create_pr, endpoint=endpoint)
    record = record.replace(push=PushRecord(repo_id=result.repo_id, commit_url=result.commit_url,
                                            pr_url=result.pr_url, commit_sha=result.commit_sha,
                                            skipped=result.skipped, reason=result.reason))
    if has_report:
        record.write(folder)
    return record


def _dry_run_report(base: CleanReport, resolved: ResolvedSource, options: CleanOptions) -> CleanReport:
    """What a run would do: the layers it would edit and the files it would write or push; writes nothing."""
    # The architecture alone decides the layers: no weights are needed (a Hub dry run fetches none).
    model = _untrained_model(resolved.local_dir)
    layers = {"given": resolve_layers(model, list(options.layers))} if options.layers else inspect_layers(model).groups
    files = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, REPORT_NAME]
    if base.format == "transformers":
        files.insert(2, PROCESSOR_CONFIG_NAME)
    if options.trigger is None and not options.triggered_data:
        # the surrogates the cross-validation may choose to forget: a mask + pattern, a full-image perturbation
        files += [f"{SURROGATE_DIR}/surrogate_pattern.png", f"{SURROGATE_DIR}/surrogate_mask.png",
                  f"{SURROGATE_DIR}/surrogate_delta.npy"]
    return base.replace(status="dry-run", candidate_layers=layers, files=files, source_files=list(resolved.files),
                        push=PlannedPush(repo_id=options.push_to, create_pr=options.create_pr) if options.push_to
                        else None)


def _untrained_model(folder: str | os.PathLike[str]) -> torch.nn.Module:
    """The architecture a folder describes, with untrained weights (the layers do not depend on the weights)."""
    if model_format(folder) == "transformers":
        return build_transformers_model(folder)
    return build_model(read_config(folder))


def inspect_source(source: str, *, revision: str | None = None, token: str | None = None, offline: bool = False,
                   allow_pickle: bool = False, endpoint: str | None = None) -> SourceInfo:
    """Format, architecture, classes, license, files and candidate layers of a checkpoint (no weights read)."""
    resolved = resolve_source(source, revision=revision, token=token, offline=offline, allow_pickle=allow_pickle,
                              dry_run=True, endpoint=endpoint)
    config = model_config(resolved.local_dir)
    model = _untrained_model(resolved.local_dir)
    preprocessor = getattr(model, "preprocessor", None)  # a transformers view carries its processor's size
    input_size = list(preprocessor.input_size if preprocessor is not None
                      else model.pretrained_cfg.get("input_size", []))
    names = label_names(config)
    return SourceInfo(source=source, format=describe_format(Path(resolved.local_dir)),
                      architecture=str(config["architecture"]), repo_id=resolved.repo_id,
                      revision=resolved.revision, num_classes=len(names), label_names=names, license=resolved.license,
                      input_size=input_size, files=list(resolved.files),
                      candidate_layers=inspect_layers(model).groups)


def evaluate_source(source: str, *, data: str, trigger: str | None = None, target: str | int | None = None,
                    revision: str | None = None, token: str | None = None, offline: bool = False,
                    allow_pickle: bool = False, endpoint: str | None = None, device: str = "auto",
                    batch_size: int | None = None, progress: ProgressCallback | None = None) -> Evaluation:
    """Metrics of the model at ``source`` on ``data`` (ASR and RA need a trigger and a target)."""
    if not data:
        raise UsageError("--data is required: an image folder, an .npz or a built-in dataset name")
    used = parse_trigger(trigger) if trigger is not None else None
    run_on = resolve_device(device)
    resolved = resolve_source(source, revision=revision, token=token, offline=offline, allow_pickle=allow_pickle,
                              endpoint=endpoint)
    names = label_names(model_config(resolved.local_dir))
    model = load_model(resolved.local_dir, allow_pickle=allow_pickle).to(run_on)
    images = load_images(data, label_names=names)
    index = resolve_target(target, names)
    preprocess = Preprocessor.from_model(model)
    counter = StageCounter(progress, "evaluation", measured_images(images, trigger=used, target=index), "images")
    metrics = measure(model, images, preprocess, trigger=used, target=index,
                      batch_size=pick_batch_size(batch_size, run_on, preprocess.input_size), progress=counter)
    return Evaluation(source=source, revision=resolved.revision, data=data, trigger=used.spec if used else None,
                      target=index, metrics=metrics.as_dict(per_class=True))
