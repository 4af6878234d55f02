"""``agme scan``: is this model backdoored? Detection only; nothing is written but an optional report.

``run_scan(source, data=...)`` resolves and loads the model as ``agme eval`` does, ranks every class by
the joint screenings of :mod:`agme_hub.engine.detection` (a patch: how small a mask reaches each class; the
whole image: how small a perturbation does), inverts the leading classes fully and returns a
:class:`ScanReport`: the verdict ("backdoor suspected" when either statistic's leader is an outlier, or "no
evidence"), the suspected target(s) with their evidence (anomaly indices, mask size and attack success of
the patch surrogate, budget and success of the full-image one) and the whole ranking. With ``report_dir`` it
also writes ``scan_report.json``, each inverted surrogate's pattern and mask as PNGs and the full-image
leader's perturbation as .npy, into a temporary folder moved into place at the end.
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
from ..engine.detection import ANOMALY_THRESHOLD, NULL_ALPHA, SUCCESS_THRESHOLD, detect_target_fast
from ..errors import DataError, UsageError
from ..progress import ProgressCallback, StageCounter
from ..hub.checkpoint import atomic_output_dir, label_names, load_model, model_config
from ..hub.outputs import check_output_dir, check_output_overlap, check_output_writable
from ..hub.sources import resolve_source
from ..surrogate_triggers import DeltaTrigger, MaskTrigger

__all__ = ["ScanReport", "SuspectedTarget", "RankedClass", "run_scan", "scan_model", "SCAN_REPORT_NAME",
           "SUSPECTED", "NO_EVIDENCE"]

SCAN_REPORT_NAME = "scan_report.json"
SUSPECTED = "backdoor suspected"
NO_EVIDENCE = "no evidence"


@dataclass(frozen=True, kw_only=True)
class SuspectedTarget:
    """A class with its evidence: the patch surrogate (a small mask that works) and the full-image one (a small
    perturbation of the whole image that reaches it). ``None``: that surrogate was not made for this class."""

    index: int
    label: str
    evidence: list[str] = field(default_factory=list)  # the statistics that call it an outlier: patch, full-image
    anomaly_index: float  # anomaly index of its screening mask (above the report's threshold: an outlier)
    mask_l1: float | None = None  # sum of the full inversion's mask over pixels
    mask_fraction: float | None = None  # mask_l1 / pixels: the share of the image the surrogate covers
    attack_success: float | None = None  # fraction of the other classes' images the patch surrogate sends here
    full_anomaly_index: float | None = None  # anomaly index of its full-image budget
    full_eps: float | None = None  # L-inf budget (of 1) at which about half of the other classes' images reach it
    full_success: float | None = None  # fraction of the other classes' images its full-image surrogate sends here
    files: list[str] = field(default_factory=list)  # its surrogates' files, when a report was written


@dataclass(frozen=True, kw_only=True)
class RankedClass:
    index: int
    label: str
    mask_l1: float  # screening mask size (all classes at the same budget)
    anomaly_index: float
    full_eps: float | None = None  # full-image budget (None: not screened, see detection.py)
    full_anomaly_index: float | None = None


@dataclass(frozen=True, kw_only=True)
class ScanReport:
    """What ``agme scan`` found; ``suspected`` is empty when the verdict is "no evidence"."""

    verdict: str  # SUSPECTED or NO_EVIDENCE
    target: int  # the leading class (a suspect only if the verdict says so)
    anomaly_index: float  # the target's patch (mask) anomaly index
    mask_l1: float | None
    attack_success: float | None
    suspected: list[SuspectedTarget]
    ranking: list[RankedClass]  # every class, most suspicious (smallest screening mask) first
    inverted: list[SuspectedTarget]  # the classes whose surrogates were made (the leaders), suspects or not
    num_classes: int
    n_images: int
    seconds: float
    full_target: int | None = None  # the class the smallest full-image perturbation reaches
    full_anomaly_index: float | None = None  # its anomaly index
    full_eps: float | None = None
    full_success: float | None = None
    threshold: float = ANOMALY_THRESHOLD  # an anomaly index above it (either statistic) is an outlier
    null_alpha: float | None = NULL_ALPHA  # a clean model's largest index passes the threshold this often (null)
    source: str | None = None
    revision: str | None = None
    data: str | None = None
    report_dir: str | None = None
    agme_version: str = __version__
    # the surrogates made, in memory (saved with --report; not part of the JSON)
    triggers: dict[int, MaskTrigger] = field(default_factory=dict, repr=False, compare=False)
    full_triggers: dict[int, DeltaTrigger] = field(default_factory=dict, repr=False, compare=False)

    @property
    def backdoor_suspected(self) -> bool:
        return self.verdict == SUSPECTED

    def evidence_lines(self) -> list[str]:
        """One line per suspected target (or, with none, for the leading class): its evidence in words."""
        def words(s: SuspectedTarget) -> str:
            parts = [f"patch: anomaly index {s.anomaly_index:.2f}"]
            if s.mask_fraction is not None:
                parts[0] += f", mask {s.mask_fraction:.1%} of the image, attack success {s.attack_success:.1%}"
            if s.full_eps is not None:
                reach = "about half of the others" if s.full_success is None else f"{s.full_success:.1%}"
                parts.append(f"full-image: anomaly index {s.full_anomaly_index:.2f}, |delta|_inf "
                             f"{255 * s.full_eps:.1f}/255 reaches {reach}")
            return "; ".join(parts)

        head = f" (an index above {self.threshold:.2f} is an outlier)"
        if self.suspected:
            return [f"suspected target: {s.index} ({s.label}), outlier by {' and '.join(s.evidence)}: {words(s)}{head}"
                    for s in self.suspected]
        return [f"leading class (not an outlier): {s.index} ({s.label}): {words(s)}{head}" for s in self.inverted[:1]]

    def table(self, rows: int = 10) -> tuple[list[str], list[list[str]]]:
        """The ranking's first ``rows`` classes as text: the columns and the rows the CLI prints."""
        def opt(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        columns = ["rank", "class", "label", "mask (screening)", "index (patch)", "full-image eps", "index (full)"]
        return columns, [[str(rank), str(e.index), e.label, f"{e.mask_l1:.1f}", f"{e.anomaly_index:.2f}",
                          "-" if e.full_eps is None else f"{255 * e.full_eps:.1f}/255", opt(e.full_anomaly_index, ".2f")]
                         for rank, e in enumerate(self.ranking[:rows], start=1)]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("triggers")
        out.pop("full_triggers")
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
    full = detection.full
    full_of = {cls: (eps, anomaly) for cls, eps, anomaly in full.ranking} if full else {}
    pixels = float(data.images[0, ..., 0].size)
    threshold = detection.threshold

    def entry(cls: int) -> SuspectedTarget:
        inv = detection.inversions.get(cls)
        eps, full_index = full_of.get(cls, (None, None))
        evidence = (["patch"] if inv is not None and index[cls] > threshold and inv.success >= SUCCESS_THRESHOLD
                    else []) + (["full-image"] if full is not None and full.flagged and cls == full.leader else [])
        return SuspectedTarget(
            index=cls, label=names[cls], evidence=evidence, anomaly_index=round(index[cls], 3),
            mask_l1=round(inv.mask_l1, 2) if inv else None,
            mask_fraction=round(inv.mask_l1 / pixels, 4) if inv else None,
            attack_success=round(inv.success, 4) if inv else None,
            full_anomaly_index=None if full_index is None else round(full_index, 3),
            full_eps=None if eps is None else round(eps, 5),
            full_success=round(full.success, 4) if full is not None and cls == full.leader else None)

    made = sorted(set(detection.inversions) | ({full.leader} if full else set()),
                  key=lambda cls: -max(index[cls], full_of.get(cls, (0, 0))[1]))
    inverted = [entry(cls) for cls in made]
    suspected = [s for s in inverted if s.evidence] if detection.flagged else []
    suspected.sort(key=lambda s: s.index != detection.target)  # the detected target first
    leader = detection.inversions.get(detection.target)
    ranking = [RankedClass(index=cls, label=names[cls], mask_l1=round(norm, 2), anomaly_index=round(anomaly, 3),
                           full_eps=None if cls not in full_of else round(full_of[cls][0], 5),
                           full_anomaly_index=None if cls not in full_of else round(full_of[cls][1], 3))
               for cls, norm, anomaly in detection.ranking]
    return ScanReport(verdict=SUSPECTED if suspected else NO_EVIDENCE, target=detection.target,
                      anomaly_index=round(detection.anomaly_index, 3),
                      mask_l1=round(leader.mask_l1, 2) if leader else None,
                      attack_success=round(leader.success, 4) if leader else None, suspected=suspected,
                      ranking=ranking, inverted=inverted, num_classes=len(names), n_images=len(data),
                      seconds=round(time.perf_counter() - start, 3),
                      full_target=full.leader if full else None,
                      full_anomaly_index=round(full.anomaly_index, 3) if full else None,
                      full_eps=round(full.eps, 5) if full else None,
                      full_success=round(full.success, 4) if full else None, threshold=round(threshold, 3),
                      triggers={cls: inv.trigger for cls, inv in detection.inversions.items()},
                      full_triggers={full.leader: full.trigger} if full else {})


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
    """``scan_report.json`` and ``surrogates/class_<i>/`` (pattern and mask PNGs, the full-image delta as .npy)."""
    def files_of(entry: SuspectedTarget) -> list[str]:
        folder = Path("surrogates") / f"class_{entry.index}"
        patch = ["surrogate_pattern.png", "surrogate_mask.png"] if entry.index in report.triggers else []
        full = ["surrogate_delta.npy"] if entry.index in report.full_triggers else []
        return [str(folder / name) for name in patch + full]

    inverted = [SuspectedTarget(**{**asdict(s), "files": files_of(s)}) for s in report.inverted]
    suspected = [SuspectedTarget(**{**asdict(s), "files": files_of(s)}) for s in report.suspected]
    report = replace(report, inverted=inverted, suspected=suspected, report_dir=str(out))
    with atomic_output_dir(out, overwrite=True) as tmp:
        for entry in inverted:
            for trigger in (report.triggers.get(entry.index), report.full_triggers.get(entry.index)):
                if trigger is not None:
                    trigger.save(tmp / "surrogates" / f"class_{entry.index}")
        (tmp / SCAN_REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
