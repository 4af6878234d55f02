"""A batch's jobs: :class:`Job`, reading and validating a jobs file, and the folders a job writes.

A job's folder is ``<out_root>/<name>/``: its output model folder ``model/`` (unless the job's ``out`` puts it
elsewhere) and its ``job.log``. ``summary.json`` and ``summary.csv`` sit beside the job folders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from ...data import BUILTIN_DATASETS
from ...errors import AgmeError, DeviceError, JobsFileError, UsageError
from ...options import CleanOptions
from ...triggers import parse_trigger

__all__ = ["Job", "default_name", "load_jobs", "parse_jobs", "check_jobs", "MODEL_DIR", "LOG_NAME", "SUMMARY_JSON",
           "SUMMARY_CSV"]

MODEL_DIR = "model"  # the output model folder inside a job's folder
LOG_NAME = "job.log"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_OPTION_FIELDS = tuple(f.name for f in fields(CleanOptions))


@dataclass(frozen=True)
class Job:
    """One model to clean: ``Job("org/model", CleanOptions(data="fashion-mnist", target="0"), name="model")``.

    ``name`` names the job's folder under ``out_root``; empty means derived from ``source``.
    """

    source: str
    options: CleanOptions = field(default_factory=CleanOptions)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", default_name(self.source))


def default_name(source: str) -> str:
    """``org/model@v2`` -> ``model``; ``./models/b/`` -> ``b``: the last part of the source, made a safe name."""
    last = source.removeprefix("hf-hub:").removeprefix("local-dir:").replace("\\", "/").rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last.split("@")[0]).strip("-.") or "job"


def load_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """Read a jobs file (``.json`` as JSON, anything else as YAML) and validate every entry before anything runs.

    Raises:
        JobsFileError: unreadable file, bad syntax, or an invalid entry; the message names the entry and the field.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise JobsFileError(f"cannot read the jobs file {path}: {err.strerror or err}") from None
    as_json = path.suffix.lower() == ".json"
    try:
        document = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        first = str(err).replace("\n", " ")
        raise JobsFileError(f"{path}: not valid {'JSON' if as_json else 'YAML'}: {first}") from None
    return parse_jobs(document, where=str(path))


def parse_jobs(document: Any, *, where: str = "jobs") -> list[Job]:
    """Jobs from a parsed jobs file (``{"defaults": {...}, "jobs": [...]}``); see :func:`load_jobs`."""
    if not isinstance(document, dict):
        raise JobsFileError(f"{where}: expected a mapping with 'jobs' (and optionally 'defaults'), "
                            f"got {type(document).__name__}")
    for key in document:
        if key not in ("defaults", "jobs"):
            raise JobsFileError(f"{where}: unknown top-level key {key!r}; a jobs file holds 'defaults' and 'jobs'")
    defaults = _fields(document.get("defaults") or {}, f"{where}: defaults", allowed=_OPTION_FIELDS)
    entries = document.get("jobs")
    if not isinstance(entries, list) or not entries:
        raise JobsFileError(f"{where}: 'jobs' must be a non-empty list of entries (each a source and options)")
    jobs = []
    for index, entry in enumerate(entries):
        label = f"{where}: jobs[{index}]"
        entry = {"source": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise JobsFileError(f"{label}: expected a source or a mapping of fields, got {type(entry).__name__}")
        source, name = entry.get("source"), entry.get("name")
        if not isinstance(source, str) or not source.strip():
            raise JobsFileError(f"{label}: field 'source' is required (a Hub repo id, timm name or local folder)")
        if name is not None and not isinstance(name, str):
            raise JobsFileError(f"{label}: field 'name' must be a string, got {name!r}")
        label = f"{label} ({name or default_name(source)})"
        values = _fields({k: v for k, v in entry.items() if k not in ("source", "name")}, label,
                         allowed=_OPTION_FIELDS)
        jobs.append(Job(source=source, options=_options({**defaults, **values}, label), name=name or ""))
    check_jobs(jobs, where=where)
    return jobs


def _fields(values: Any, label: str, *, allowed: Sequence[str]) -> dict[str, Any]:
    """Keys normalized to field names (``per-class`` -> ``per_class``); an unknown key suggests the closest."""
    if not isinstance(values, dict):
        raise JobsFileError(f"{label}: expected a mapping of field names to values, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            close = get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (the fields are those of `agme clean`)"
            raise JobsFileError(f"{label}: unknown field {key!r}{hint}")
        out[name] = value
    return out


def _options(values: dict[str, Any], label: str) -> CleanOptions:
    try:
        options = CleanOptions.from_dict(values, where=label)
    except (UsageError, DeviceError) as err:  # a device spec is checked here; whether it is present, when the job runs
        message = str(err)
        raise JobsFileError(message if message.startswith(label) else f"{label}: {message}") from None
    if options.trigger is not None:
        try:
            parse_trigger(options.trigger)
        except AgmeError as err:
            raise JobsFileError(f"{label}: field 'trigger': {err}") from None
    return options


def check_jobs(jobs: Sequence[Job], *, where: str = "jobs") -> None:
    """Names are unique folder names, every job has data, no two jobs write the same output folder."""
    seen: dict[str, int] = {}
    outs: dict[str, int] = {}
    for index, job in enumerate(jobs):
        label = f"{where}: jobs[{index}] ({job.name})"
        if not _NAME_RE.match(job.name) or job.name in (SUMMARY_JSON, SUMMARY_CSV):
            raise JobsFileError(f"{label}: field 'name' {job.name!r} is not a usable folder name "
                                f"(letters, digits, '.', '_' and '-')")
        if job.name in seen:
            raise JobsFileError(f"{label}: name {job.name!r} is already used by jobs[{seen[job.name]}]; "
                                f"give each entry a unique 'name'")
        seen[job.name] = index
        if not job.options.data:
            raise JobsFileError(f"{label}: field 'data' is required (an image folder, an .npz or a built-in "
                                f"dataset), in the entry or in 'defaults'")
        if job.options.out:
            out = str(Path(job.options.out).expanduser().resolve())
            if out in outs:
                raise JobsFileError(f"{label}: field 'out' is the output folder of jobs[{outs[out]}] too")
            outs[out] = index


def model_dir(job: Job, root: Path) -> Path:
    """The job's output model folder: its ``out`` option, else ``<root>/<name>/model``."""
    return Path(job.options.out) if job.options.out else root / job.name / MODEL_DIR


def log_path(job: Job, root: Path) -> Path:
    return root / job.name / LOG_NAME


def absolute(job: Job) -> Job:
    """Local paths made absolute, so that workers whose working folder differs (Ray tasks) find them."""

    def local(value: str | None) -> str | None:
        if not value or value.partition(":")[0] in BUILTIN_DATASETS or not Path(value).expanduser().exists():
            return value
        return str(Path(value).expanduser().resolve())

    changes = {name: local(getattr(job.options, name)) for name in ("data", "eval_data", "trigger")}
    if job.options.out:
        changes["out"] = str(Path(job.options.out).expanduser().resolve())
    return Job(source=local(job.source) or job.source, options=job.options.replace(**changes), name=job.name)
