"""``agme scan``: is this model backdoored? Detection only; nothing is written but an optional report.

``run_scan(source, data=...)`` resolves and loads the model as ``agme eval`` does, ranks every class by
the joint screening of :mod:`agme_hub.engine.detection`, inverts the leading classes fully and returns a
:class:`ScanReport`: the verdict ("backdoor suspected" or "no evidence"), the suspected target(s) with
their evidence (MAD anomaly index, mask size, attack success of the surrogate) and the whole ranking.
With ``report_dir`` it also writes ``scan_report.json`` and each inverted surrogate's pattern and mask as
PNGs, into a temporary folder moved into place at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..constants import DEFAULT_INVERSION_STEPS
from ..data import ImageSet, Preprocessor, balanced_indices, load_images
from ..devices import pick_batch_size, resolve_device
from ..engine.detection import ANOMALY_THRESHOLD, SUCCESS_THRESHOLD, detect_target_fast
from ..errors import DataError, UsageError
from ..progress import ProgressCallback, StageCounter
from ..hub.checkpoint import atomic_output_dir, label_names, load_model, model_config
from ..hub.outputs import check_output_dir, check_output_overlap, check_output_writable
from ..hub.sources import resolve_source
from ..triggers import MaskTrigger

__all__ = ["ScanReport", "SuspectedTarget", "RankedClass", "run_scan", "scan_model", "SCAN_REPORT_NAME",
           "SUSPECTED", "NO_EVIDENCE"]

SCAN_REPORT_NAME = "scan_report.json"
SUSPECTED = "backdoor suspected"
NO_EVIDENCE = "no evidence"


@dataclass(frozen=True, kw_only=True)
class SuspectedTarget:
    """A class whose surrogate trigger is an outlier: small, and it works."""

    index: int
    label: str
    anomaly_index: float  # MAD anomaly index of its screening mask (> 2: outlier)
    mask_l1: float  # sum of the full inversion's mask over pixels
    mask_fraction: float  # mask_l1 / pixels: the share of the image the surrogate covers
    attack_success: float  # fraction of the other classes' images the surrogate sends to this class
    files: list[str] = field(default_factory=list)  # its pattern and mask PNGs, when a report was written


@dataclass(frozen=True, kw_only=True)
class RankedClass:
    index: int
    label: str
    mask_l1: float  # screening mask size (all classes at the same budget)
    anomaly_index: float


@dataclass(frozen=True, kw_only=True)
class ScanReport:
    """What ``agme scan`` found; ``suspected`` is empty when the verdict is "no evidence"."""

    verdict: str  # SUSPECTED or NO_EVIDENCE
    target: int  # the leading class (a suspect only if the verdict says so)
    anomaly_index: float
    mask_l1: float
    attack_success: float
    suspected: list[SuspectedTarget]
    ranking: list[RankedClass]  # every class, most suspicious (smallest screening mask) first
    inverted: list[SuspectedTarget]  # the classes inverted fully (the leaders), suspects or not
    num_classes: int
    n_images: int
    seconds: float
    threshold: float = ANOMALY_THRESHOLD
    source: str | None = None
    revision: str | None = None
    data: str | None = None
    report_dir: str | None = None
    agme_version: str = __version__
    # the inverted classes' surrogates, in memory (saved as PNGs with --report; not part of the JSON)
    triggers: dict[int, MaskTrigger] = field(default_factory=dict, repr=False, compare=False)

    @property
    def backdoor_suspected(self) -> bool:
        return self.verdict == SUSPECTED

    def evidence_lines(self) -> list[str]:
        """One line per suspected target (or, with none, for the leading class): its evidence in words."""
        what = "suspected target" if self.suspected else "leading class (not an outlier)"
        return [f"{what}: {s.index} ({s.label}): anomaly index {s.anomaly_index:.2f} (> {self.threshold:g} is an "
                f"outlier), surrogate mask {s.mask_fraction:.1%} of the image, attack success {s.attack_success:.1%}"
                for s in self.suspected or self.inverted[:1]]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("triggers")
        return out


def scan_model(model: torch.nn.Module, data: ImageSet, *, steps: int = DEFAULT_INVERSION_STEPS, seed: int = 0,
               top_k: int = 2, names: list[str] | None = None, batch_size: int = 256,
               progress: ProgressCallback | None = None) -> ScanReport:
    """Scan a model in memory with the clean images ``data``; ``names`` label the classes (default: data's).

    Runs where ``model`` is; ``batch_size`` only chunks the final forward passes.
    """
    start = time.perf_counter()
    names = names or list(data.label_names)
    steps_done = StageCounter(progress, "inversion", (1 + top_k) * steps, "steps")
    detection = detect_target_fast(model, data, steps=steps, seed=seed, top_k=top_k, eval_batch_size=batch_size,
                                   progress=steps_done)
    index = {cls: anomaly for cls, _, anomaly in detection.ranking}
    pixels = float(data.images[0, ..., 0].size)
    inverted = [SuspectedTarget(index=cls, label=names[cls], anomaly_index=round(index[cls], 3),
                                mask_l1=round(inv.mask_l1, 2), mask_fraction=round(inv.mask_l1 / pixels, 4),
                                attack_success=round(inv.success, 4))
                for cls, inv in sorted(detection.inversions.items(), key=lambda item: -index[item[0]])]
    suspected = [s for s in inverted if s.anomaly_index > ANOMALY_THRESHOLD and s.attack_success >= SUCCESS_THRESHOLD]
    if detection.flagged:  # the detected target first
        suspected.sort(key=lambda s: s.index != detection.target)
    else:
        suspected = []
    leader = detection.inversions[detection.target]
    ranking = [RankedClass(index=cls, label=names[cls], mask_l1=round(norm, 2), anomaly_index=round(anomaly, 3))
               for cls, norm, anomaly in detection.ranking]
    return ScanReport(verdict=SUSPECTED if suspected else NO_EVIDENCE, target=detection.target,
                      anomaly_index=round(detection.anomaly_index, 3), mask_l1=round(leader.mask_l1, 2),
                      attack_success=round(leader.success, 4), suspected=suspected, ranking=ranking, inverted=inverted,
                      num_classes=len(names), n_images=len(data), seconds=round(time.perf_counter() - start, 3),
                      triggers={cls: inv.trigger for cls, inv in detection.inversions.items()})


def run_scan(source: str, *, data: str, per_class: int | None = None, report_dir: str | os.PathLike[str] | None = None,
             yes: bool = False, seed: int = 0, steps: int = DEFAULT_INVERSION_STEPS, revision: str | None = None,
             token: str | None = None, offline: bool = False, allow_pickle: bool = False,
             endpoint: str | None = None, device: str = "auto", batch_size: int | None = None,
             progress: ProgressCallback | None = None) -> ScanReport:
    """Scan the model at ``source`` (the source forms of ``agme eval``) with the clean images ``data``.

    ``per_class`` uses that many images of each class (all when None). Nothing is written unless
    ``report_dir`` is given: then ``scan_report.json`` and the surrogates' PNGs, moved into place at the end.
    """
    if not data:
        raise UsageError("--data is required: an image folder, an .npz or a built-in dataset name")
    if per_class is not None and per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {per_class}")
    out = Path(report_dir).expanduser().resolve() if report_dir else None
    run_on = resolve_device(device)  # a missing GPU fails now, before any download or output
    local_source = Path(source.removeprefix("local-dir:")).expanduser()
    if out is not None:  # before any download: a bad --report must not cost a pull
        _check_report_dir(out, yes=yes, inputs={"source model": local_source if local_source.exists() else None,
                                                "data": data})
    resolved = resolve_source(source, revision=revision, token=token, offline=offline, allow_pickle=allow_pickle,
                              endpoint=endpoint)
    names = label_names(model_config(resolved.local_dir))
    model = load_model(resolved.local_dir, allow_pickle=allow_pickle).to(run_on)
    images = load_images(data, label_names=names)
    if per_class is not None:
        images = images.subset(balanced_indices(images.labels, per_class, seed=seed))
    if len(set(images.labels.tolist())) < 2:
        raise DataError("--data holds images of one class only; a scan needs clean images of several classes")
    batch = pick_batch_size(batch_size, run_on, Preprocessor.from_model(model).input_size)
    result = scan_model(model, images, steps=steps, seed=seed, names=names, batch_size=batch, progress=progress)
    result = replace(result, source=source, revision=resolved.revision, data=str(data))
    if out is not None:
        result = _write_report(result, out)
    return result


def _check_report_dir(out: Path, *, yes: bool, inputs: dict[str, Any]) -> None:
    check_output_overlap(out, inputs)
    check_output_writable(out)
    check_output_dir(out, yes=yes)


def _write_report(report: ScanReport, out: Path) -> ScanReport:
    """``scan_report.json`` and ``surrogates/class_<i>/`` (pattern and mask PNGs), all at once."""
    def files_of(entry: SuspectedTarget) -> list[str]:
        folder = Path("surrogates") / f"class_{entry.index}"
        return [str(folder / "surrogate_pattern.png"), str(folder / "surrogate_mask.png")]

    inverted = [SuspectedTarget(**{**asdict(s), "files": files_of(s)}) for s in report.inverted]
    suspected = [SuspectedTarget(**{**asdict(s), "files": files_of(s)}) for s in report.suspected]
    report = replace(report, inverted=inverted, suspected=suspected, report_dir=str(out))
    with atomic_output_dir(out, overwrite=True) as tmp:
        for entry in inverted:
            report.triggers[entry.index].save(tmp / "surrogates" / f"class_{entry.index}")
        (tmp / SCAN_REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
