"""Render, validate and write the model card (``README.md``) of an agme output folder.

``render_card(report)`` turns a run's report (:class:`agme_hub.report.CleanReport`) into card text: the YAML metadata comes from
``huggingface_hub.ModelCardData`` and the body from the Jinja template ``model_cards/agme_card.md.jinja``.
``validate_card(text)`` checks a card offline with ``huggingface_hub.ModelCard``. ``write_card`` and
``rerender_card`` put the card into a folder. Nothing here touches the network.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..constants import AGME_MARKER, CARD_NAME, REPORT_NAME
from ..errors import CardValidationError, OutputExistsError, RepoNotFoundError, ReportError
from ..report import CleanReport, PlannedPush, PushRecord, format_change, format_percent, write_text_atomic
from .outputs import record_written

__all__ = ["TEMPLATE_NAME", "template_path", "render_card", "validate_card", "write_card", "rerender_card"]

_logger = logging.getLogger(__name__)

TEMPLATE_NAME = "agme_card.md.jinja"
_REQUIRED_TAGS = ("agme", "backdoor-removal")
_TAGS = ["image-classification", "timm", "agme", "backdoor-removal", "safetensors"]
_NOT_MEASURED = "not measured"
_NOT_RECORDED = "not recorded"

# (report key, row name in the table, model-index metric type, which evaluation set it is measured on).
_METRICS = (
    ("clean_accuracy", "Clean accuracy", "accuracy", "clean"),
    ("attack_success_rate", "Attack success rate", "attack_success_rate", "triggered"),
    ("target_accuracy", "Target-class accuracy", "target_class_accuracy", "clean"),
    ("robust_accuracy", "Robust accuracy", "robust_accuracy", "triggered"),
)


# TEMPLATE
def template_path() -> Path:
    """Find the card template: package data of an installed wheel first, then the repository's ``model_cards/``.

    Returns:
        The path of ``agme_card.md.jinja``.

    Raises:
        FileNotFoundError: When neither place holds the template (a packaging bug, not a user error).
    """
    packaged = resources.files("agme_hub").joinpath("model_cards", TEMPLATE_NAME)
    # A wheel is always installed unpacked, so the resource is a real file; a zipped import is not supported.
    if isinstance(packaged, Path) and packaged.is_file():
        return packaged
    in_repo = Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME  # the repository root
    if in_repo.is_file():
        return in_repo
    raise FileNotFoundError(f"agme's card template {TEMPLATE_NAME} is missing from {packaged} and {in_repo}")


# FORMATTING: every value on the card passes through one of these, so that no None or nan ever prints.
def _number(value: Any) -> float | None:
    """Return value as a float when it is a finite number, else None (not measured)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _percent(value: Any) -> str:
    return format_percent(value, missing=_NOT_MEASURED)


def _change(before: Any, after: Any) -> str:
    return format_change(before, after, unit="points", missing=_NOT_MEASURED)


def _cell(value: Any) -> str:
    """Make text safe inside a Markdown table cell or list item."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|").replace("<", "&lt;")


def _code(value: Any) -> str:
    text = " ".join(str(value).split())
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _scalar(value: Any) -> str:
    """Format a method parameter; numbers use ``g`` so 0.01 stays 0.01 and 4.0 becomes 4."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_code(item) for item in value) if value else "none"
    return _cell(value)


def _seconds(value: Any) -> str | None:
    number = _number(value)
    if number is None:
        return None
    if number < 60:
        return f"{number:.1f} s"
    minutes, rest = divmod(round(number), 60)
    return f"{minutes} min {rest} s"


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug[:64] or "custom"


def _count(value: Any, noun: str) -> str | None:
    number = _number(value)
    return None if number is None else f"{int(number)} {noun}{'' if int(number) == 1 else 's'}"


def _pushed_to(report: CleanReport) -> str | None:
    return report.push.repo_id if isinstance(report.push, (PushRecord, PlannedPush)) else None


# METADATA
def _model_name(report: CleanReport) -> str:
    """Name the cleaned model: the pushed repo's name, else the source's name plus ``-agme``."""
    repo_id = _pushed_to(report)
    if repo_id:
        return repo_id.rstrip("/").split("/")[-1]
    for value in (report.source, report.architecture):
        if value:
            return f"{Path(value.rstrip('/')).name}-agme"
    return "agme-model"


def _eval_dataset(report: CleanReport) -> tuple[str, str]:
    """Return (dataset type, readable name) of the evaluation images for model-index."""
    edit, evaluation = report.data.edit, report.data.eval
    # Metrics on the held-out part of --data: the set is --data's.
    if edit and (not evaluation or report.eval_source == "held-out"):
        base = edit
    else:
        base = evaluation or "evaluation images"
    # Paths would make the type machine-specific; the last component is enough to tell sets apart.
    short = " ".join((Path(base).name if os.sep in base else base).split())
    return _slug(short), short


def _eval_results(report: CleanReport) -> list[EvalResult]:
    """One EvalResult per measured after-metric; metrics that were not measured are left out."""
    dataset_type, dataset_name = _eval_dataset(report)
    surrogate = report.asr_trigger == "surrogate"
    results = []
    for key, name, metric_type, images in _METRICS:
        value = _number(report.after.get(key))
        if value is None:
            continue
        if images == "triggered" and surrogate:
            name = f"{name} (surrogate trigger)"
        args = {"trigger": report.trigger.spec} if images == "triggered" and report.trigger.spec else None
        results.append(EvalResult(
            task_type="image-classification",
            dataset_type=dataset_type,
            dataset_name=f"{dataset_name} ({'clean' if images == 'clean' else 'with trigger'})",
            dataset_config=images,  # model-index groups results by config: clean and triggered sets stay apart
            dataset_args=args,
            metric_type=metric_type,
            metric_name=name,
            metric_value=value,
        ))
    return results


def _agme_block(report: CleanReport) -> dict[str, Any]:
    """A small custom ``agme:`` metadata block; values that were not recorded are left out."""
    method = report.method
    block = {
        "version": report.agme_version,
        "source": report.source,
        "source_revision": report.revision,
        "mode": report.mode,
        "method": method.name,
        "layers": list(method.layers) if method.layers is not None else None,
        "lam": _number(method.lam),
        "gamma": _number(method.gamma),
        "trigger": report.trigger.spec,
        "trigger_kind": report.trigger.kind,
        "target_class": report.target.index,
    }
    return {key: value for key, value in block.items() if value is not None}


def _library(report: CleanReport) -> str:
    """The library that loads the output: ``transformers`` for a transformers source, else ``timm``."""
    return "transformers" if report.format == "transformers" else "timm"


def _card_data(report: CleanReport) -> ModelCardData:
    base_model = report.base_model or None
    results = _eval_results(report)
    library = _library(report)
    return ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,  # a relation without a base model means nothing
        library_name=library,
        pipeline_tag="image-classification",
        license=report.license or None,  # carried over from the source, never invented
        tags=[library if tag == "timm" else tag for tag in _TAGS],
        model_name=_model_name(report) if results else None,
        eval_results=results or None,
        agme=_agme_block(report) or None,
    )


# BODY
def _summary(report: CleanReport, name: str) -> str:
    source, revision = report.source, report.revision
    if report.source_kind == "hub" and source:
        origin = f"[`{source}`](https://huggingface.co/{source})"
        origin += f" at commit `{revision}`" if revision else " (revision not recorded)"
    elif source:
        origin = f"the local model folder {_code(source)}"
    else:
        origin = "a source model that was not recorded"
    layers, target = report.method.layers, report.target
    what = "layers"
    if layers:
        what = f"the {_scalar(layers)} layer{'s' if len(layers) > 1 else ''}"
    model = f" of this {_code(report.architecture)} classifier" if report.architecture else ""
    classes = f" ({report.num_classes} classes)" if report.num_classes is not None else ""
    goal = "a backdoor"
    if target.index is not None:
        label = f" ({_cell(target.label)})" if target.label is not None else ""
        goal = f"a backdoor that sends triggered images to class {target.index}{label}"
    version = f" {_cell(report.agme_version)}" if report.agme_version else ""
    parts = [f"`{name}` is a sanitized derivative of {origin}, made by agme{version}.",
             f"agme edited {what}{model}{classes} to remove {goal}."]
    if target.detected and target.evidence is False:  # detection found no outlier: nothing was edited
        arch = f" {_code(report.architecture)}" if report.architecture else ""
        parts = [f"`{name}` is a copy of {origin}, checked by agme{version}.",
                 f"agme found no evidence of a backdoor in this{arch} classifier{classes} and left its weights "
                 "unchanged."]
    asr = "the attack success rate"
    if report.asr_trigger == "surrogate":
        asr += " (with the surrogate trigger)"
    changes = [
        f"{metric} went from {_percent(report.before.get(key))} to {_percent(report.after.get(key))}"
        for key, metric in (("attack_success_rate", asr), ("clean_accuracy", "clean accuracy"))
        if _number(report.before.get(key)) is not None and _number(report.after.get(key)) is not None
    ]
    if changes:
        where = _count(report.data.n_eval_images, "evaluation image")
        sentence = " and ".join(changes)
        parts.append(f"On {where}, {sentence}." if where else f"{sentence[0].upper()}{sentence[1:]}.")
    return " ".join(parts)


def _metric_rows(report: CleanReport) -> list[dict[str, str]]:
    return [
        {"name": name, "before": _percent(report.before.get(key)), "after": _percent(report.after.get(key)),
         "change": _change(report.before.get(key), report.after.get(key))}
        for key, name, _, _ in _METRICS
    ]


def _asr_note(report: CleanReport) -> str:
    if report.asr_trigger is None:
        return "Attack success rate and robust accuracy were not measured: no trigger was available."
    if report.asr_trigger == "surrogate":
        return ("Attack success rate and robust accuracy were measured with the **surrogate trigger** (reconstructed "
                "by agme, not the real one): they show that the reconstructed trigger was removed, not that the real "
                "one was.")
    return f"Attack success rate and robust accuracy were measured with the {_cell(report.asr_measured_with)}."


def _timing(report: CleanReport) -> tuple[str, str]:
    timing = report.timing or {}
    stages = [f"{stage} {_seconds(value)}" for stage, value in timing.items()
              if stage != "total" and _seconds(value) is not None]
    runtime = report.runtime or {}
    if runtime.get("device"):  # where those seconds were spent
        stages.append(f"on {runtime['device']}" + (f", batches of {runtime['batch_size']}"
                                                    if runtime.get("batch_size") else ""))
    return _seconds(timing.get("total")) or _NOT_MEASURED, ", ".join(stages)


def _mode(report: CleanReport) -> str:
    if report.mode == "bdk":
        return "`bdk`: the trigger was known and given to agme."
    if report.mode == "no-bdk":
        return "`no-bdk`: the trigger was not known; agme worked without it."
    return _NOT_RECORDED


def _trigger(report: CleanReport) -> str:
    trigger = report.trigger
    spec = _code(trigger.spec) if trigger.spec else None
    if trigger.kind == "given":
        return f"given by the user: {spec or 'spec ' + _NOT_RECORDED}."
    if trigger.kind == "surrogate":
        return f"a surrogate reconstructed by agme (not the real trigger): {spec or 'spec ' + _NOT_RECORDED}."
    return f"{spec}." if spec else "none: no trigger was used."


def _target(report: CleanReport) -> str:
    target = report.target
    if target.index is None:
        return _NOT_RECORDED
    label = f" ({_cell(target.label)})" if target.label is not None else ""
    how = "detected by agme" if target.detected else "given by the user"
    return f"{target.index}{label}, {how}."


def _detection(report: CleanReport) -> dict[str, Any] | None:
    target = report.target
    if not target.detected:
        return None
    anomaly = _number(target.anomaly_index)
    summary = f"anomaly index {anomaly:.2f}" if anomaly is not None else f"anomaly index {_NOT_MEASURED}"
    if target.evidence is not None:
        summary += (" (an outlier: evidence of a backdoor)" if target.evidence
                    else " (no outlier: no evidence of a backdoor, the model was not edited)")
    labels = report.label_names or []
    rows = []
    for rank, (index, score) in enumerate(target.ranking or [], start=1):
        label = labels[index] if isinstance(index, int) and 0 <= index < len(labels) else _NOT_RECORDED
        number = _number(score)
        rows.append({"rank": rank, "index": index, "label": _cell(label),
                     "score": _NOT_MEASURED if number is None else f"{number:.3f}"})
    summary += "; classes ranked by suspicion below." if rows else "; no ranking was recorded."
    return {"summary": summary, "ranking": rows}


def _method_rows(report: CleanReport) -> list[dict[str, str]]:
    names = (("name", "Method"), ("layers", "Edited layers"), ("lam", "lam"), ("gamma", "gamma"),
             ("repair", "Repair"), ("target_weight", "Repair target weight"),
             ("refitted", "Classifier re-fitted by the repair"), ("augment_copies", "Augmented copies"),
             ("bn_stats", "BatchNorm statistics"), ("seed", "Seed"))
    refitted = report.method.refitted  # "" (not re-fitted) reads "no", None (not recorded) as any missing value
    values = {key: getattr(report.method, key) for key, _ in names} | {"refitted": [refitted] if refitted else
                                                                        (False if refitted == "" else None)}
    return [{"name": label, "value": _scalar(values[key])} for key, label in names]


def _version_rows(report: CleanReport) -> list[dict[str, str]]:
    versions = report.provenance.versions or {}
    return [{"name": _cell(name), "value": _scalar(value)} for name, value in versions.items()] or \
        [{"name": "agme", "value": _scalar(report.agme_version)}]


def _source(report: CleanReport) -> tuple[str, str]:
    source, revision = report.source, report.revision
    if not source:
        return _NOT_RECORDED, _NOT_RECORDED
    if report.source_kind == "hub":
        text = f"[`{source}`](https://huggingface.co/{source}) on the Hugging Face Hub"
        rev = f"[`{revision}`](https://huggingface.co/{source}/tree/{revision})" if revision else _NOT_RECORDED
        return text, rev
    return f"local folder {_code(source)}", f"{_NOT_RECORDED} (a local folder has no Hub revision)"


def _load(report: CleanReport) -> tuple[str, str]:
    repo_id = _pushed_to(report)
    if repo_id:
        note = ""
        pr_url = report.push.pr_url if isinstance(report.push, PushRecord) else None
        if pr_url:
            note = (f"This model was pushed as a [pull request]({pr_url}); the snippet loads the repo's main "
                    "branch, which holds this model once the pull request is merged.")
        return (repo_id if _library(report) == "transformers" else f"hf-hub:{repo_id}"), note
    folder = report.output_dir or "PATH/TO/THIS/FOLDER"
    return (str(folder) if _library(report) == "transformers" else f"local-dir:{folder}"), ""


def _status_note(report: CleanReport) -> str:
    if report.status in (None, "complete"):
        return ""
    return f"this run's status is {_code(report.status)}, not `complete`: some results may be missing."


def _repair_note(report: CleanReport) -> str | None:
    """Target-class accuracy with and without the repair, when both were measured."""
    without = _number(report.after_without_repair.target_accuracy) if report.after_without_repair else None
    with_repair = _number(report.after.target_accuracy)
    if without is None or with_repair is None:
        return None
    return (f"**Repair:** target-class accuracy after the edit is {_percent(with_repair)} with the repair and "
            f"{_percent(without)} without it.")


def _context(report: CleanReport) -> dict[str, Any]:
    """Every value the template shows, already formatted: the template only lays them out."""
    name = _model_name(report)
    data = report.data
    time_total, time_stages = _timing(report)
    source, revision = _source(report)
    load_id, push_note = _load(report)
    edit_images = _count(report.n_edit_images, "clean image") or f"clean images (number {_NOT_RECORDED})"
    if report.per_class is not None:
        edit_images += f" ({report.per_class} per class)"
    eval_images = _count(data.n_eval_images, "image") or f"images (number {_NOT_RECORDED})"
    sha = report.provenance.weights_sha256
    return {
        "marker": AGME_MARKER,
        "title": (f"{name}: checked by agme, no evidence of a backdoor" if report.target.evidence is False
                  else f"{name}: backdoor removed with agme"),
        "summary": _summary(report, name),
        "status_note": _status_note(report),
        "metric_rows": _metric_rows(report),
        "edit_data": f"{edit_images} from {_cell(data.edit or 'a source ' + _NOT_RECORDED)}",
        "eval_data": f"{eval_images} from {_cell(data.eval or 'a source ' + _NOT_RECORDED)}",
        "asr_note": _asr_note(report),
        "repair_note": _repair_note(report),
        "time_total": time_total,
        "time_stages": time_stages,
        "mode": _mode(report),
        "trigger": _trigger(report),
        "target": _target(report),
        "detection": _detection(report),
        "method_rows": _method_rows(report),
        "selection": _cell(report.method.selection or _NOT_RECORDED),
        "source": source,
        "revision": revision,
        "weights_sha256": _code(sha) if sha else _NOT_RECORDED,
        "version_rows": _version_rows(report),
        "load_id": load_id,
        "library": _library(report),
        "push_note": push_note,
        "command": " ".join((report.command or f"# command {_NOT_RECORDED}").splitlines()),
    }


# PUBLIC API
def render_card(report: CleanReport | Mapping[str, Any]) -> str:
    """Render the model card of a cleaned model from its report. Pure: no files written, no network.

    Args:
        report: The run's report, or the content of ``agme_report.json``. Any field may be None where it
            was not measured.

    Returns:
        The card text: YAML metadata, the agme marker and the Markdown body.
    """
    # StrictUndefined turns a typo in the template into an error instead of a silently empty cell.
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                     keep_trailing_newline=True, autoescape=False)
    template = environment.from_string(template_path().read_text(encoding="utf-8"))
    typed = report if isinstance(report, CleanReport) else CleanReport.from_json(report)
    return template.render(card_data=_card_data(typed).to_yaml(), **_context(typed))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _tags(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(tag) for tag in value] if isinstance(value, Iterable) else []


def validate_card(text: str, *, base_model: str | None = None, library_name: str = "timm") -> None:
    """Check a card offline: the metadata parses and holds what the Hub and agme need.

    Args:
        text: The card text.
        base_model: The source repo id when known; the card must then declare it as ``base_model``.
        library_name: The library the card must name: ``timm``, or ``transformers`` for a transformers model.

    Raises:
        CardValidationError: With a one-line message naming the first problem found.
    """
    try:
        metadata: dict[str, Any] = ModelCard(text).data.to_dict()  # type: ignore[no-untyped-call]
    except (ValueError, yaml.YAMLError) as error:
        raise CardValidationError(f"model card metadata is invalid: {_one_line(error)}") from error
    if not metadata:
        raise CardValidationError("model card has no YAML metadata block at its top")
    if base_model is not None and base_model not in _tags(metadata.get("base_model")):
        found = metadata.get("base_model")
        raise CardValidationError(f"model card metadata: base_model must be {base_model!r}, found {found!r}")
    for key, expected in (("library_name", library_name), ("pipeline_tag", "image-classification")):
        if metadata.get(key) != expected:
            raise CardValidationError(f"model card metadata: {key} must be {expected!r}, found {metadata.get(key)!r}")
    missing = [tag for tag in _REQUIRED_TAGS if tag not in _tags(metadata.get("tags"))]
    if missing:
        raise CardValidationError(f"model card metadata: tags must include {', '.join(missing)}")
    index = metadata.get("model-index")
    if not isinstance(index, list) or not index:
        raise CardValidationError("model card metadata: model-index is missing (no measured metric to report)")
    for entry in index:
        if not entry.get("name") or not entry.get("results"):
            raise CardValidationError("model card metadata: every model-index entry needs a name and results")
        if any(not result.get("metrics") for result in entry["results"]):
            raise CardValidationError("model card metadata: every model-index result needs metrics")


def write_card(folder: str | os.PathLike[str], report: CleanReport | Mapping[str, Any], *,
               overwrite: bool = False) -> Path:
    """Render, validate and write ``README.md`` into an output folder.

    Args:
        folder: The output folder; it must exist.
        report: The run's report (see ``render_card``).
        overwrite: Replace a README.md that agme did not write (one without the agme marker).

    Returns:
        The path of the written card.

    Raises:
        RepoNotFoundError: When the folder does not exist.
        OutputExistsError: When the folder holds someone else's README.md and ``overwrite`` is False.
        CardValidationError: When the rendered card does not validate (see ``validate_card``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RepoNotFoundError(f"output folder {folder} does not exist: create it or check the path")
    path = folder / CARD_NAME
    if path.is_file() and not overwrite and AGME_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        raise OutputExistsError(f"{path} was not written by agme: move it away or pass --yes to replace it")
    typed = report if isinstance(report, CleanReport) else CleanReport.from_json(report)
    text = render_card(typed)
    validate_card(text, base_model=typed.base_model or None, library_name=_library(typed))
    write_text_atomic(path, text)
    _logger.debug("wrote model card %s", path)
    return path


def rerender_card(folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Re-render ``README.md`` of an output folder from its ``agme_report.json`` (for ``agme card DIR``).

    Args:
        folder: An agme output folder.
        overwrite: Replace a README.md that agme did not write.

    Returns:
        The path of the written card.

    Raises:
        RepoNotFoundError: When the folder does not exist.
        UsageError: When the folder has no readable report.
        OutputExistsError: When the folder holds someone else's README.md and ``overwrite`` is False.
        ReportError: When the report lacks the results a card shows (an unfinished run).
        CardValidationError: When the rendered card does not validate.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RepoNotFoundError(f"folder {folder} does not exist: pass the output folder of `agme clean`")
    report = CleanReport.load(folder)
    missing = [part for part in ("before", "after") if getattr(report, part).clean_accuracy is None]
    if report.status != "complete" or missing:
        raise ReportError(f"{folder / REPORT_NAME} has no {(missing or ['complete'])[0]!r} results (status "
                          f"{report.status or 'unknown'!r}): only a complete `agme clean` run has a card")
    path = write_card(folder, report, overwrite=overwrite)
    record_written(folder, [CARD_NAME])
    return path
