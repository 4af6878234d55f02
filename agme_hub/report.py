"""The run report: one typed definition of ``agme_report.json``, read by the card, the CLI, batch and push.

    report = clean_source("org/name", CleanOptions(data="imgs/", trigger="badnets-white-br", target="0"))
    report.after.attack_success_rate, report.method.layers, report.asr_trigger   # typed, no string keys
    report.to_json()                  # the dict written as agme_report.json (key order is part of the format)
    CleanReport.load(folder)          # read it back; fields missing from an older or hand-made file are None

Every dataclass here is frozen and built by keyword. ``from_json`` is tolerant on purpose: a model card
must render from a partial report (any field may be None where it was not measured), so unknown types
become None rather than errors; only a file that is not a JSON object at all is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .constants import REPORT_NAME
from .errors import UsageError

__all__ = [
    "HEADLINE_METRICS", "MetricValues", "TriggerRecord", "TargetRecord", "DataRecord", "MethodRecord", "PushRecord",
    "PlannedPush", "Provenance", "CleanReport", "SourceInfo", "Evaluation", "RUN_DETAILS", "same_result",
    "format_percent", "format_change", "write_text_atomic", "current_umask",
]

# Fields that differ between two runs that made the same model: how long each stage took, the device and batch
# size it ran with (they change the edit only by float rounding), where the folder was pushed, and the list of written files (it holds the card's sha256, which shows the timings).
RUN_DETAILS = frozenset({"timing", "runtime", "push", "output_files"})

# The four headline metrics, in the order every table shows them: (key, label).
HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("clean_accuracy", "clean accuracy"),
    ("attack_success_rate", "attack success rate"),
    ("target_accuracy", "target-class accuracy"),
    ("robust_accuracy", "robust accuracy"),
)


# ------------------------------------------------------------------------------------------ formatting
def _finite(value: Any) -> float | None:
    """A finite number as float, else None (not measured): bools, strings and nan are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def format_percent(value: Any, *, missing: str = "not measured") -> str:
    """``0.1234`` -> ``"12.3%"``; the one percent formatter of the CLI and the card."""
    number = _finite(value)
    return missing if number is None else f"{number * 100:.1f}%"


def format_change(before: Any, after: Any, *, unit: str = "pt", missing: str = "") -> str:
    """Change in percentage points between two fractions, from the rounded percentages shown beside it.

    Subtracting the rounded numbers keeps the column consistent with the two values printed next to it.
    """
    first, second = _finite(before), _finite(after)
    if first is None or second is None:
        return missing
    delta = round(round(second * 100, 1) - round(first * 100, 1), 1)
    return f"{delta + 0.0:+.1f} {unit}"  # + 0.0 turns -0.0 into 0.0, so no change prints as +0.0


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write through a temporary file in the same folder, so an interrupted write never leaves half a file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain write would follow the umask
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ parts
def _get(values: Any, key: str) -> Any:
    return values.get(key) if isinstance(values, Mapping) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value) is not None \
        else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _strings(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else None


@dataclass(frozen=True, kw_only=True)
class MetricValues:
    """The four headline metrics as fractions in [0, 1]; None where not measured."""

    clean_accuracy: float | None = None
    attack_success_rate: float | None = None
    target_accuracy: float | None = None
    robust_accuracy: float | None = None

    @classmethod
    def of(cls, metrics: Any) -> "MetricValues":
        """From an engine ``Metrics`` (or anything with these attributes), rounded to 6 digits as written."""
        values = {key: getattr(metrics, key, None) for key, _ in HEADLINE_METRICS}
        return cls(**{k: (round(v, 6) if v is not None else None) for k, v in values.items()})

    @classmethod
    def from_json(cls, values: Any) -> "MetricValues":
        # nan survives as nan here (the card shows it as "not measured"); only non-numbers become None.
        return cls(**{key: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
                      for key, v in ((k, _get(values, k)) for k, _ in HEADLINE_METRICS)})

    def get(self, key: str) -> float | None:
        return getattr(self, key)

    def to_json(self) -> dict[str, float | None]:
        return {key: getattr(self, key) for key, _ in HEADLINE_METRICS}


@dataclass(frozen=True, kw_only=True)
class TriggerRecord:
    """The trigger the edit used: the user's (``given``) or one reconstructed by agme (``surrogate``)."""

    spec: str | None = None
    kind: Literal["given", "surrogate"] | None = None
    files: str | None = None  # the forgotten surrogates' saved files, as specs (``image:``/``additive:``) joined by '; '

    @classmethod
    def from_json(cls, values: Any) -> "TriggerRecord":
        kind = _get(values, "kind")
        return cls(spec=_str(_get(values, "spec")), kind=kind if kind in ("given", "surrogate") else None,
                   files=_str(_get(values, "files")))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if self.files is not None:
            out["files"] = self.files
        return out


@dataclass(frozen=True, kw_only=True)
class TargetRecord:
    """The target class, and how it was found (given, or detected with an anomaly index and a ranking)."""

    index: int | None = None
    label: str | None = None
    detected: bool | None = None
    anomaly_index: float | None = None
    ranking: list[tuple[int, float]] | None = None  # (class, mask L1), most suspicious first
    # detection's verdict: True an outlier whose surrogate works (evidence of a backdoor), False none (the model
    # was left unchanged), None not detected (target given)
    evidence: bool | None = None

    @classmethod
    def from_json(cls, values: Any) -> "TargetRecord":
        ranking = _get(values, "ranking")
        rows = None
        if isinstance(ranking, list):
            rows = [(entry[0], entry[1]) for entry in ranking if isinstance(entry, (list, tuple)) and len(entry) == 2]
        anomaly = _get(values, "anomaly_index")
        return cls(index=_int(_get(values, "index")), label=_str(_get(values, "label")),
                   detected=_bool(_get(values, "detected")),
                   anomaly_index=float(anomaly) if _finite(anomaly) is not None else None, ranking=rows,
                   evidence=_bool(_get(values, "evidence")))

    def to_json(self) -> dict[str, Any]:
        ranking = [list(row) for row in self.ranking] if self.ranking is not None else None
        return {"index": self.index, "label": self.label, "detected": self.detected,
                "anomaly_index": self.anomaly_index, "ranking": ranking, "evidence": self.evidence}


@dataclass(frozen=True, kw_only=True)
class DataRecord:
    """Which images were used: ``edit`` (the clean handful) and ``eval`` (a description of the held-out set)."""

    edit: str | None = None
    eval: str | None = None
    n_eval_images: int | None = None

    @classmethod
    def from_json(cls, values: Any) -> "DataRecord":
        return cls(edit=_str(_get(values, "edit")), eval=_str(_get(values, "eval")),
                   n_eval_images=_int(_get(values, "n_eval_images")))

    def to_json(self) -> dict[str, Any]:
        return {"edit": self.edit, "eval": self.eval, "n_eval_images": self.n_eval_images}


@dataclass(frozen=True, kw_only=True)
class MethodRecord:
    """What the edit did: layers, lam, gamma, repair, and how the choice was made."""

    name: str | None = "agme"
    lam: float | None = None
    gamma: float | None = None
    layers: list[str] | None = None
    repair: bool | None = None
    target_weight: float | None = None
    refitted: str | None = None  # the classifier the repair's second pass re-fitted (engine/repair.py); "": none
    augment_copies: int | None = None
    bn_stats: str | None = None
    seed: int | None = None
    selection: str | None = None

    @classmethod
    def from_json(cls, values: Any) -> "MethodRecord":
        number = lambda key: _get(values, key) if _finite(_get(values, key)) is not None else None  # noqa: E731
        return cls(name=_str(_get(values, "name")), lam=number("lam"), gamma=number("gamma"),
                   layers=_strings(_get(values, "layers")), repair=_bool(_get(values, "repair")),
                   target_weight=number("target_weight"), refitted=_str(_get(values, "refitted")),
                   augment_copies=_int(_get(values, "augment_copies")),
                   bn_stats=_str(_get(values, "bn_stats")), seed=_int(_get(values, "seed")),
                   selection=_str(_get(values, "selection")))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class PushRecord:
    """What a push did: the commit or pull request, or why nothing was committed."""

    repo_id: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    commit_sha: str | None = None
    skipped: bool | None = None
    reason: str | None = None

    @classmethod
    def from_json(cls, values: Any) -> "PushRecord":
        return cls(repo_id=_str(_get(values, "repo_id")), commit_url=_str(_get(values, "commit_url")),
                   pr_url=_str(_get(values, "pr_url")), commit_sha=_str(_get(values, "commit_sha")),
                   skipped=_bool(_get(values, "skipped")), reason=_str(_get(values, "reason")))

    @property
    def url(self) -> str | None:
        return self.pr_url or self.commit_url

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class PlannedPush:
    """The push a dry run would make."""

    repo_id: str
    create_pr: bool

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "create_pr": self.create_pr}


@dataclass(frozen=True, kw_only=True)
class Provenance:
    weights_sha256: str | None = None
    versions: dict[str, str] | None = None

    @classmethod
    def from_json(cls, values: Any) -> "Provenance":
        versions = _get(values, "versions")
        return cls(weights_sha256=_str(_get(values, "weights_sha256")),
                   versions={str(k): str(v) for k, v in versions.items()} if isinstance(versions, Mapping) else None)

    def to_json(self) -> dict[str, Any]:
        return {"weights_sha256": self.weights_sha256, "versions": self.versions}


# ------------------------------------------------------------------------------------------ the report
Status = Literal["running", "complete", "dry-run"]


@dataclass(frozen=True, kw_only=True)
class CleanReport:
    """One run of ``agme clean``: what was read, what was done, what was measured, where it went.

    The fields of a finished run (``target`` ... ``provenance``) are None in a dry run, whose own fields
    (``candidate_layers``, ``files``, ``source_files``) are None otherwise.
    """

    agme_version: str | None = None
    status: str | None = None  # one of Status; a hand-made file may say anything
    source: str | None = None
    source_kind: Literal["hub", "local"] | None = None
    revision: str | None = None  # the 40-hex commit of a Hub source
    base_model: str | None = None
    license: str | None = None
    architecture: str | None = None
    num_classes: int | None = None
    label_names: list[str] | None = None
    format: Literal["timm", "transformers"] | None = None  # the source's format, which the output keeps
    mode: Literal["bdk", "no-bdk"] | None = None
    trigger: TriggerRecord = field(default_factory=TriggerRecord)
    options: dict[str, Any] = field(default_factory=dict)  # CleanOptions.public_dict(), tuples as lists
    output_dir: str | None = None
    push: PushRecord | PlannedPush | None = None
    command: str | None = None
    # a finished run
    target: TargetRecord = field(default_factory=TargetRecord)
    n_edit_images: int | None = None
    per_class: int | None = None
    data: DataRecord = field(default_factory=DataRecord)
    method: MethodRecord = field(default_factory=MethodRecord)
    before: MetricValues = field(default_factory=MetricValues)
    after: MetricValues = field(default_factory=MetricValues)
    after_without_repair: MetricValues | None = None
    asr_measured_with: str | None = None  # prose for readers; code reads ``asr_trigger``
    timing: dict[str, float] | None = None  # stage -> seconds, in the order the stages ran
    runtime: dict[str, Any] | None = None  # {"device": the device it ran on, "batch_size": images per forward pass}
    provenance: Provenance = field(default_factory=Provenance)
    # every file agme wrote beside the report, with its sha256: what makes the folder agme's (hub/outputs.py)
    output_files: dict[str, str] | None = None
    # a dry run
    candidate_layers: dict[str, list[str]] | None = None
    files: list[str] | None = None
    source_files: list[str] | None = None

    # typed views of what code used to find by reading prose
    @property
    def asr_trigger(self) -> Literal["given", "surrogate"] | None:
        """Which trigger the attack success rate was measured with (None: not measured)."""
        return self.trigger.kind if self.asr_measured_with else None

    @property
    def eval_source(self) -> Literal["held-out", "separate"]:
        """Whether the metrics come from the part of ``--data`` not used for editing, or from ``--eval-data``."""
        return "separate" if self.options.get("eval_data") else "held-out"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def replace(self, **changes: Any) -> "CleanReport":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The ``agme_report.json`` object; the key order is the file's (readers diff these files)."""
        out: dict[str, Any] = {
            "agme_version": self.agme_version, "status": self.status, "source": self.source,
            "source_kind": self.source_kind, "revision": self.revision, "base_model": self.base_model,
            "license": self.license, "architecture": self.architecture, "num_classes": self.num_classes,
            "label_names": self.label_names, **({"format": self.format} if self.format else {}),
            "mode": self.mode, "trigger": self.trigger.to_json(),
            "options": self.options, "output_dir": self.output_dir,
            "push": self.push.to_json() if self.push is not None else None, "command": self.command,
        }
        if self.status == "dry-run":
            out.update(candidate_layers=self.candidate_layers, files=self.files, source_files=self.source_files)
            return out
        out.update({
            "target": self.target.to_json(), "n_edit_images": self.n_edit_images, "per_class": self.per_class,
            "data": self.data.to_json(), "method": self.method.to_json(), "before": self.before.to_json(),
            "after": self.after.to_json(),
            "after_without_repair": self.after_without_repair.to_json() if self.after_without_repair else None,
            "asr_measured_with": self.asr_measured_with,
        })
        if self.timing is not None:
            out["timing"] = self.timing
        if self.runtime is not None:
            out["runtime"] = self.runtime
        out["provenance"] = self.provenance.to_json()
        if self.output_files is not None:
            out["output_files"] = self.output_files
        return out

    def to_text(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def same_result(self, other: "CleanReport") -> bool:
        """Equal but for the run details (``RUN_DETAILS``): a re-run that changed nothing."""
        return same_result(self.to_json(), other.to_json())

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> "CleanReport":
        """Build from a report object; tolerant of missing fields and of values of the wrong type."""
        push = values.get("push")
        planned = isinstance(push, Mapping) and "create_pr" in push and "commit_sha" not in push
        timing = values.get("timing")
        runtime = values.get("runtime")
        after_without = values.get("after_without_repair")
        layers = values.get("candidate_layers")
        mode = values.get("mode")
        kind = values.get("source_kind")
        return cls(
            agme_version=_str(values.get("agme_version")), status=_str(values.get("status")),
            source=_str(values.get("source")), source_kind=kind if kind in ("hub", "local") else None,
            revision=_str(values.get("revision")), base_model=_str(values.get("base_model")),
            license=_str(values.get("license")), architecture=_str(values.get("architecture")),
            num_classes=_int(values.get("num_classes")), label_names=_strings(values.get("label_names")),
            format=fmt if (fmt := values.get("format")) in ("timm", "transformers") else None,
            mode=mode if mode in ("bdk", "no-bdk") else None, trigger=TriggerRecord.from_json(values.get("trigger")),
            options=dict(values["options"]) if isinstance(values.get("options"), Mapping) else {},
            output_dir=_str(values.get("output_dir")),
            push=(PlannedPush(repo_id=str(push["repo_id"]), create_pr=bool(push["create_pr"])) if planned
                  else PushRecord.from_json(push) if isinstance(push, Mapping) else None),
            command=_str(values.get("command")), target=TargetRecord.from_json(values.get("target")),
            n_edit_images=_int(values.get("n_edit_images")), per_class=_int(values.get("per_class")),
            data=DataRecord.from_json(values.get("data")), method=MethodRecord.from_json(values.get("method")),
            before=MetricValues.from_json(values.get("before")), after=MetricValues.from_json(values.get("after")),
            after_without_repair=MetricValues.from_json(after_without) if isinstance(after_without, Mapping) else None,
            asr_measured_with=_str(values.get("asr_measured_with")),
            timing=({str(k): v for k, v in timing.items()} if isinstance(timing, Mapping) else None),
            runtime=({str(k): v for k, v in runtime.items()} if isinstance(runtime, Mapping) else None),
            provenance=Provenance.from_json(values.get("provenance")),
            candidate_layers=({str(k): _strings(v) or [] for k, v in layers.items()}
                              if isinstance(layers, Mapping) else None),
            files=_strings(values.get("files")), source_files=_strings(values.get("source_files")),
            output_files=({str(k): v for k, v in files.items() if isinstance(v, str)}
                          if isinstance(files := values.get("output_files"), Mapping) else None),
        )

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``agme_report.json`` into ``folder`` (atomically)."""
        path = Path(folder) / REPORT_NAME
        write_text_atomic(path, self.to_text())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "CleanReport":
        """Read ``agme_report.json`` of an output folder.

        Raises:
            UsageError: the folder has no report, or it is not a readable JSON object.
        """
        path = Path(folder) / REPORT_NAME
        if not path.is_file():
            raise UsageError(f"{folder} has no {REPORT_NAME}, so it is not an agme output folder: "
                             "run `agme clean` first")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"cannot read {path}: {' '.join(str(error).split())}; "
                             "run `agme clean` again to rewrite it") from error
        if not isinstance(values, dict):
            raise UsageError(f"{path} does not hold a JSON object; run `agme clean` again to rewrite it")
        return cls.from_json(values)


def same_result(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    """Whether two report objects (as read from files) differ only in ``RUN_DETAILS``; every other key counts."""
    return ({k: v for k, v in ours.items() if k not in RUN_DETAILS}
            == {k: v for k, v in theirs.items() if k not in RUN_DETAILS})


# ------------------------------------------------------------------------------------------ other results
@dataclass(frozen=True, kw_only=True)
class SourceInfo:
    """What ``agme inspect`` shows: a checkpoint's format, classes, files and candidate layers (no weights read)."""

    source: str
    format: str
    architecture: str
    repo_id: str | None
    revision: str | None
    num_classes: int
    label_names: list[str]
    license: str | None
    input_size: list[int]
    files: list[str]
    candidate_layers: dict[str, list[str]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """What ``agme eval`` measured on a model: the metrics (per class too) on the given images."""

    source: str
    revision: str | None
    data: str
    trigger: str | None
    target: int | None
    metrics: dict[str, Any]  # Metrics.as_dict(per_class=True)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
