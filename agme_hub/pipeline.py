"""The product's pipeline: SOURCE -> cleaned, documented (and maybe published) model folder.

``run_clean(source, options)`` is what ``agme clean``, ``agme batch`` and scripts call. It loads the
model, splits the data, measures before, cleans with :func:`agme_hub.engine.clean`, measures after,
writes the folder atomically (weights, config, report, card) and pushes it in one commit.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .card import write_card
from .checkpoint import atomic_output_dir, load_model, model_config, model_format, read_config, save_model, sha256_file
from .constants import AGME_MARKER, CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from .data import ImageSet, Preprocessor, balanced_indices, load_images, split_edit_eval
from .engine import clean, inspect_layers
from .errors import ClassMismatchError, OutputExistsError, UsageError
from .metrics import Metrics, measure
from .options import CleanOptions
from .sources import ResolvedSource, resolve_source
from .transformers_format import PROCESSOR_CONFIG_NAME, build_transformers_model
from .triggers import MaskTrigger, parse_trigger

__all__ = ["run_clean", "push_output", "inspect_source", "evaluate_source", "run_demo", "demo_model_dir",
           "resolve_target", "default_output_dir", "library_versions", "check_output_dir", "SURROGATE_DIR",
           "Reporter"]

SURROGATE_DIR = "surrogate_trigger"

Reporter = Callable[[str], None]  # receives one line per stage ("capture", ...) for progress display


def library_versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import timm
    import torch

    versions = {"agme": __version__, "torch": torch.__version__, "timm": timm.__version__,
                "huggingface_hub": huggingface_hub.__version__, "safetensors": safetensors.__version__}
    transformers = sys.modules.get("transformers")  # recorded when a transformers model was loaded
    if transformers is not None:
        versions["transformers"] = transformers.__version__
    return versions


def resolve_target(target: str | int | None, label_names: list[str]) -> int | None:
    """A class index or a label name -> class index."""
    if target is None:
        return None
    text = str(target)
    if text in label_names:
        return label_names.index(text)
    try:
        index = int(text)
    except ValueError:
        raise ClassMismatchError(f"target {text!r} is neither a class index nor a label name "
                                 f"({', '.join(label_names[:10])})") from None
    if not 0 <= index < len(label_names):
        raise ClassMismatchError(f"target class {index} is out of range: the model has {len(label_names)} classes "
                                 f"(0..{len(label_names) - 1})")
    return index


def default_output_dir(resolved: ResolvedSource) -> Path:
    name = resolved.repo_id.split("/")[-1] if resolved.repo_id else Path(resolved.local_dir).name
    return Path.cwd() / f"{name}-agme"


def check_output_dir(out: Path, *, yes: bool) -> None:
    """An existing folder may be replaced only if agme wrote it, or if the user said ``--yes``."""
    if not out.exists() or yes:
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    entries = list(out.iterdir())
    card = out / CARD_NAME
    ours = (out / REPORT_NAME).is_file() and (not card.exists() or AGME_MARKER in card.read_text(errors="ignore"))
    if entries and not ours:
        raise OutputExistsError(f"{out} exists and holds files agme did not write; choose another --out or pass --yes")


def _metrics_dict(metrics: Metrics | None) -> dict[str, float | None]:
    keys = ("clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy")
    if metrics is None:
        return {k: None for k in keys}
    return {k: (round(v, 6) if v is not None else None) for k, v in ((k, getattr(metrics, k)) for k in keys)}


def _command(source: str, options: CleanOptions) -> str:
    """The `agme clean` command line that reproduces this run (without the token)."""
    parts = ["agme", "clean", source]
    defaults = CleanOptions()
    for name, value in options.public_dict().items():
        if name in {"dry_run", "yes"} or value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, tuple):
            for item in value:
                parts += ["--layers", str(item)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _load_data(options: CleanOptions, label_names: list[str]) -> tuple[ImageSet, ImageSet, str]:
    data = load_images(options.data, label_names=label_names)
    if options.eval_data:
        edit = data.subset(balanced_indices(data.labels, options.per_class, seed=options.seed), f"{options.data}")
        evaluation = load_images(options.eval_data, label_names=label_names)
        if options.eval_per_class:
            evaluation = evaluation.subset(balanced_indices(evaluation.labels, options.eval_per_class,
                                                            seed=options.seed + 1))
        return edit, evaluation, f"{options.eval_data} ({len(evaluation)} images)"
    edit, evaluation = split_edit_eval(data, options.per_class, seed=options.seed,
                                       eval_per_class=options.eval_per_class)
    return edit, evaluation, f"held-out part of {options.data} (not used for editing)"


def run_clean(source: str, options: CleanOptions, *, report: Reporter | None = None,
              endpoint: str | None = None) -> dict[str, Any]:
    """Clean the model at ``source`` as ``options`` say; returns the report (also written as agme_report.json).

    Raises:
        AgmeError: any input, model, Hub or output problem, with a one-line message.
    """
    say = report or (lambda line: None)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    if not options.data:
        raise UsageError("--data is required: an image folder, an .npz or a built-in dataset name")
    if options.trigger is not None:
        trigger = parse_trigger(options.trigger)
    else:
        trigger = None
    say("resolving the source")
    resolved = resolve_source(source, revision=options.revision, token=options.token, offline=options.offline,
                              allow_pickle=options.allow_pickle, dry_run=options.dry_run, endpoint=endpoint)
    config = model_config(resolved.local_dir)  # timm config, or a summary of a transformers one
    out = Path(options.out).resolve() if options.out else default_output_dir(resolved)
    if not options.dry_run:
        check_output_dir(out, yes=options.yes)
    label_names = list(config.get("label_names") or [str(i) for i in range(int(config.get("num_classes", 0)))])
    target = resolve_target(options.target, label_names)

    base: dict[str, Any] = {
        "agme_version": __version__, "status": "running", "source": source, "source_kind": resolved.kind,
        "revision": resolved.revision, "base_model": resolved.repo_id, "license": resolved.license,
        "architecture": config.get("architecture"), "num_classes": len(label_names), "label_names": label_names,
        "format": config.get("format", "timm"),
        "mode": "bdk" if trigger is not None else "no-bdk",
        "trigger": {"spec": trigger.spec if trigger else None, "kind": "given" if trigger else None},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.public_dict().items()},
        "output_dir": str(out), "push": None, "command": _command(source, options),
    }
    if options.dry_run:
        return _dry_run_report(base, resolved, options, out)

    say("loading the model")
    model = load_model(resolved.local_dir, allow_pickle=options.allow_pickle)
    edit_set, eval_set, eval_what = _load_data(options, label_names)
    timing["load"] = time.perf_counter() - start
    preprocess = Preprocessor.from_model(model)

    say(f"cleaning with {len(edit_set)} images")
    result = clean(model, edit_set, trigger=trigger, target=target, repair=options.repair, lam=options.lam,
                   gamma=options.gamma, layers=list(options.layers) if options.layers else None, seed=options.seed,
                   augment_copies=options.augment_copies, target_weight=options.target_weight,
                   bn_stats=options.bn_stats, inversion_steps=options.inversion_steps)
    timing["capture"] = result.timings.get("capture", 0.0) + result.timings.get("selection_capture", 0.0)
    timing["edit"] = (result.timings.get("solve", 0.0) + result.timings.get("selection", 0.0)
                      - result.timings.get("selection_capture", 0.0) + result.timings.get("bn_stats", 0.0))
    timing["inversion"] = result.timings.get("inversion", 0.0)
    timing["repair"] = 0.0  # the repair is part of the same solve (a weighted preserve term)

    say("evaluating before and after")
    t0 = time.perf_counter()
    measured_trigger = trigger if trigger is not None else result.trigger
    before = measure(model, eval_set, preprocess, trigger=measured_trigger, target=result.target)
    after = measure(result.model, eval_set, preprocess, trigger=measured_trigger, target=result.target)
    without_repair = None
    if result.unrepaired_model is not None:
        without_repair = measure(result.unrepaired_model, eval_set, preprocess, trigger=measured_trigger,
                                 target=result.target)
    timing["eval"] = time.perf_counter() - t0

    detection = result.detection
    record = dict(base)
    record.update({
        "status": "complete",
        "target": {"index": result.target, "label": label_names[result.target] if result.target is not None else None,
                   "detected": result.target_detected,
                   "anomaly_index": round(detection.anomaly_index, 3) if detection else None,
                   "ranking": [[c, round(norm, 2)] for c, norm, _ in detection.ranking] if detection else None},
        "n_edit_images": len(edit_set), "per_class": options.per_class,
        "data": {"edit": options.data, "eval": eval_what, "n_eval_images": len(eval_set)},
        "method": {"name": "agme", "lam": result.lam, "gamma": result.gamma, "layers": result.layers,
                   "repair": options.repair, "target_weight": result.target_weight,
                   "augment_copies": result.augment_copies, "bn_stats": result.bn_stats, "seed": result.seed,
                   "selection": result.selection.describe() if result.selection else "given by the user"},
        "before": _metrics_dict(before), "after": _metrics_dict(after),
        "after_without_repair": _metrics_dict(without_repair) if without_repair else None,
        "asr_measured_with": ("given trigger" if trigger is not None
                              else "surrogate trigger (reconstructed, not the real one)"),
    })
    if trigger is None:
        record["trigger"] = {"spec": result.trigger.spec, "kind": "surrogate"}

    say("saving")
    t0 = time.perf_counter()
    source_ref = resolved.ref if resolved.kind == "hub" else str(resolved.local_dir)
    metadata = {"agme.version": __version__, "agme.source": source_ref,
                "agme.method": json.dumps(record["method"], sort_keys=True),
                "agme.parameters": json.dumps({k: record["options"][k] for k in
                                               ("trigger", "target", "per_class", "seed")}, sort_keys=True)}
    with atomic_output_dir(out, overwrite=True) as tmp:
        save_model(result.model, tmp, label_names=label_names, pretrained_cfg=config.get("pretrained_cfg"),
                   model_args=config.get("model_args"), metadata=metadata)
        if config.get("format") != "transformers":  # save_pretrained writes the whole transformers config
            _keep_config(tmp / CONFIG_NAME, config)
        if isinstance(result.trigger, MaskTrigger):
            record["trigger"]["files"] = result.trigger.save(tmp / SURROGATE_DIR).replace(str(tmp), str(out))
        timing["save"] = time.perf_counter() - t0
        timing["total"] = time.perf_counter() - start
        record["timing"] = {k: round(v, 3) for k, v in timing.items()}
        record["provenance"] = {"weights_sha256": sha256_file(tmp / WEIGHTS_NAME), "versions": library_versions()}
        (tmp / REPORT_NAME).write_text(json.dumps(record, indent=2) + "\n")
        write_card(tmp, record, overwrite=True)
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
                create_pr: bool = False, endpoint: str | None = None) -> dict[str, Any]:
    """Push an output folder in one commit and record the push in its report (locally)."""
    from .hub import push_folder

    folder = Path(folder)
    report_path = folder / REPORT_NAME
    record = json.loads(report_path.read_text()) if report_path.is_file() else {}
    result = push_folder(folder, repo_id, token=token, private=private, create_pr=create_pr, endpoint=endpoint)
    record["push"] = {"repo_id": result.repo_id, "commit_url": result.commit_url, "pr_url": result.pr_url,
                      "commit_sha": result.commit_sha, "skipped": result.skipped, "reason": result.reason}
    if report_path.is_file():
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, report_path)
    return record


def _dry_run_report(base: dict[str, Any], resolved: ResolvedSource, options: CleanOptions, out: Path) -> dict[str, Any]:
    """What a run would do: the layers it would edit and the files it would write or push; writes nothing."""
    from .units import resolve_layers

    # The architecture alone decides the layers: no weights are needed (a Hub dry run fetches none).
    model = _untrained_model(resolved.local_dir)
    layers = {"given": resolve_layers(model, list(options.layers))} if options.layers else inspect_layers(model).groups
    record = dict(base)
    files = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, REPORT_NAME]
    if base.get("format") == "transformers":
        files.insert(2, PROCESSOR_CONFIG_NAME)
    if options.trigger is None:
        files += [f"{SURROGATE_DIR}/surrogate_pattern.png", f"{SURROGATE_DIR}/surrogate_mask.png"]
    record.update({"status": "dry-run", "candidate_layers": layers, "files": files,
                   "source_files": list(resolved.files),
                   "push": {"repo_id": options.push_to, "create_pr": options.create_pr} if options.push_to else None})
    return record


def _untrained_model(folder: str | os.PathLike[str]) -> Any:
    """The architecture a folder describes, with untrained weights (the layers do not depend on the weights)."""
    import timm

    from .checkpoint import parse_config

    if model_format(folder) == "transformers":
        return build_transformers_model(folder)
    name, pretrained_cfg, model_args = parse_config(read_config(folder))
    return timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args).eval()


def inspect_source(source: str, *, revision: str | None = None, token: str | None = None, offline: bool = False,
                   allow_pickle: bool = False, endpoint: str | None = None) -> dict[str, Any]:
    """Format, architecture, classes, license, files and candidate layers of a checkpoint (no weights read)."""
    from .checkpoint import describe_format

    resolved = resolve_source(source, revision=revision, token=token, offline=offline, allow_pickle=allow_pickle,
                              dry_run=True, endpoint=endpoint)
    config = model_config(resolved.local_dir)
    model = _untrained_model(resolved.local_dir)
    name = config["architecture"]
    input_size = list(getattr(model, "preprocessor").input_size) if hasattr(model, "preprocessor") else \
        list(model.pretrained_cfg.get("input_size", []))
    label_names = list(config.get("label_names") or [str(i) for i in range(int(config.get("num_classes", 0)))])
    return {"source": source, "format": describe_format(Path(resolved.local_dir)), "architecture": name,
            "repo_id": resolved.repo_id, "revision": resolved.revision, "num_classes": len(label_names),
            "label_names": label_names, "license": resolved.license,
            "input_size": input_size, "files": list(resolved.files),
            "candidate_layers": inspect_layers(model).groups}


def evaluate_source(source: str, *, data: str, trigger: str | None = None, target: str | int | None = None,
                    revision: str | None = None, token: str | None = None, offline: bool = False,
                    allow_pickle: bool = False, endpoint: str | None = None) -> dict[str, Any]:
    """Metrics of the model at ``source`` on ``data`` (ASR and RA need a trigger and a target)."""
    if not data:
        raise UsageError("--data is required: an image folder, an .npz or a built-in dataset name")
    used = parse_trigger(trigger) if trigger is not None else None
    resolved = resolve_source(source, revision=revision, token=token, offline=offline, allow_pickle=allow_pickle,
                              endpoint=endpoint)
    config = model_config(resolved.local_dir)
    model = load_model(resolved.local_dir, allow_pickle=allow_pickle)
    label_names = list(config.get("label_names") or [str(i) for i in range(int(config.get("num_classes", 0)))])
    images = load_images(data, label_names=label_names)
    index = resolve_target(target, label_names)
    metrics = measure(model, images, Preprocessor.from_model(model), trigger=used, target=index)
    return {"source": source, "revision": resolved.revision, "data": data, "trigger": used.spec if used else None,
            "target": index, "metrics": metrics.as_dict(per_class=True)}


# The embedded default job: a small ResNet backdoored on Fashion-MNIST with a BadNets patch.
DEMO_BACKDOOR = dict(dataset="fashion-mnist", arch="resnet10t", trigger="badnets-white-br", target=0,
                     poison_rate=0.1, epochs=2, seed=0, n_train=None, n_test=None,
                     model_args={"channels": [16, 32, 64, 128]})


def demo_model_dir() -> Path:
    """Train the demo's backdoored model once and cache it (``AGME_CACHE``); returns its folder."""
    import hashlib

    from .attack import BackdoorConfig, train_backdoored
    from .constants import cache_dir

    key = hashlib.sha256(json.dumps(DEMO_BACKDOOR, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / f"demo-fashion-mnist-resnet-{key}"
    if not (folder / WEIGHTS_NAME).is_file():
        train_backdoored(BackdoorConfig(**DEMO_BACKDOOR), out_dir=folder, progress=True, overwrite=True)
    return folder


def run_demo(*, out: str | os.PathLike[str] | None = None, per_class: int = 10,
             report: Reporter | None = None) -> dict[str, Any]:
    """Backdoor (or reuse) a ResNet on Fashion-MNIST, clean it with ``per_class`` images per class."""
    say = report or (lambda line: None)
    say("training (or reusing) the backdoored demo model")
    folder = demo_model_dir()
    options = CleanOptions(data="fashion-mnist", trigger=str(DEMO_BACKDOOR["trigger"]), target="0",
                           per_class=per_class, out=str(out or Path.cwd() / "fashion-mnist-demo-agme"))
    return run_clean(str(folder), options, report=report)
