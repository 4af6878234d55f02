"""Measure target detection and ``agme scan`` on real trained models: accuracy, TPR/FPR and cost.

Models are trained once and cached: backdoored ones with several triggers and architectures, clean ones by the
same recipe with poison rate 0 (other seeds, both architectures), a 20-class one (MNIST digits and
Fashion-MNIST items, ``mnist+fashion-mnist``), and the bench's own backdoored models (``agme_hub.lab.bench``,
target 0: the five families of ``benchmarks/results/fmnist-5arch`` x its ten triggers, the same cached models)
with clean models of each family trained by the bench's recipe without poison. Run
``python -m agme_hub.lab.scan_study`` to print every number it measures::

    python -m agme_hub.lab.scan_study accuracy [NAME...]   # one row per model: both indices, verdict, target
    python -m agme_hub.lab.scan_study summary ROWS.jsonl [NAME...]  # TPR, FPR, right targets of those rows, by family
    python -m agme_hub.lab.scan_study cost [--img-size N] [K...]  # detection cost against one inversion
    python -m agme_hub.lab.scan_study indices [NAME...]    # both screenings' leaders: MAD index and log-Grubbs index

A NAME may be a glob (``'bench-vit-*'``, ``'*-clean-*'``). A backdoored model whose backdoor did not take (ASR
under the bench's 80 %, measured when it was trained) is scanned and reported, but left out of the TPR, as the
bench leaves its cell undefended.

``DEVELOPMENT`` are the models the detection was designed on; the others were added to measure it after its
design was fixed (docs/METHOD.md, issue 12).
"""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..app.scan import ScanReport, scan_model
from ..constants import cache_dir
from ..data import ImageSet, balanced_indices, load_images
from ..engine.detection import FULL_SHARE, detect_target_fast, outlier_scores, screen_classes, screen_full
from ..engine.inversion import anomaly_indices, invert_trigger
from ..errors import UsageError
from ..hub.checkpoint import load_model
from .backdoor import BACKDOOR_NAME, BackdoorConfig, cached_backdoored, create_classifier
from .bench.grid import BenchConfig, arch_spec
from .bench.models import backdoored_model, resolve_trigger

__all__ = ["StudyModel", "STUDY_MODELS", "DEVELOPMENT", "study_model", "study_config", "edit_images",
           "detection_cost", "study_row", "match_models", "summarize_rows"]

# The recipe of the tests' models (tests/conftest.py): a narrow ResNet-10 on 300 images per class, 6 epochs.
# The bench's ARCHS give the same for ResNet (and the narrow ConvNeXt its recipe).
SMALL_RESNET = {"channels": [16, 32, 64, 128]}
STUDY_TRAINING = dict(n_train=300, n_test=100, img_size=32)
# The five-family bench (benchmarks/results/fmnist-5arch): its families and triggers, whose models the study scans.
FIVE_FAMILIES = ("resnet10t", "convnext", "mobilenetv3", "efficientnet", "vit")
BENCH_TRIGGERS = ("badnets-white-br", "badnets-checker-br", "badnets-noise-center", "badnets-bar-bl",
                  "badnets-red-tr", "blend", "image", "additive", "sig", "warp")
MIN_BACKDOOR_ASR = BenchConfig().min_asr  # under it the backdoor did not take (the bench's rule)


@dataclass(frozen=True)
class StudyModel:
    name: str
    dataset: str
    trigger: str  # a spec, or with ``bench`` a name of the bench's TRIGGERS
    target: int
    poison_rate: float  # 0: a clean model, trained by the same recipe without poison
    seed: int = 0
    arch: str = "resnet10t"  # a name of the bench's ARCHS
    bench: bool = False  # the bench's cached model of (arch, trigger): quick recipe, target 0, seed 0

    @property
    def backdoored(self) -> bool:
        return self.poison_rate > 0


STUDY_MODELS: dict[str, StudyModel] = {m.name: m for m in [
    StudyModel("fmnist-white-br", "fashion-mnist", "badnets-white-br", 1, 0.1),
    StudyModel("fmnist-checker-br-t3", "fashion-mnist", "badnets-checker-br", 3, 0.1),
    StudyModel("fmnist-blend-t5", "fashion-mnist", "blend:alpha=0.1,image=noise,seed=0", 5, 0.1),
    StudyModel("fmnist-clean-s0", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=0),
    StudyModel("fmnist-clean-s1", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=1),
    StudyModel("twenty-white-br-t13", "mnist+fashion-mnist", "badnets-white-br", 13, 0.1),
    # added after the design was fixed
    StudyModel("fmnist-noise-center-t7", "fashion-mnist", "badnets-noise-center", 7, 0.1),
    StudyModel("fmnist-clean-s2", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=2),
    StudyModel("fmnist-clean-s3", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=3),
    StudyModel("fmnist-clean-s4", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=4),
    StudyModel("convnext-clean-s0", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=0, arch="convnext"),
    StudyModel("convnext-clean-s1", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=1, arch="convnext"),
    StudyModel("convnext-clean-s2", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=2, arch="convnext"),
    StudyModel("convnext-clean-s3", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=3, arch="convnext"),
    StudyModel("fmnist-clean-s5", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=5),
    StudyModel("convnext-checker-br-t3", "fashion-mnist", "badnets-checker-br", 3, 0.1, arch="convnext"),
    # the bench's models (ResNet and ConvNeXt with a white patch, blend, additive and SIG added in stop 18; the rest of
    # the five-family bench in stop 25), and clean models of its other three families (stop 25)
    *[StudyModel(f"bench-{arch}-{trigger}", "fashion-mnist", trigger, 0, 0.1, arch=arch, bench=True)
      for arch in FIVE_FAMILIES for trigger in BENCH_TRIGGERS],
    *[StudyModel(f"{arch}-clean-s{seed}", "fashion-mnist", "badnets-white-br", 1, 0.0, seed=seed, arch=arch)
      for arch in ("mobilenetv3", "efficientnet", "vit") for seed in (0, 1)],
]}
DEVELOPMENT = ("fmnist-white-br", "fmnist-checker-br-t3", "fmnist-blend-t5", "fmnist-clean-s0", "fmnist-clean-s1",
               "twenty-white-br-t13")


def study_config(model: StudyModel) -> BackdoorConfig:
    spec = arch_spec(model.arch)
    return BackdoorConfig(dataset=model.dataset, arch=spec.timm_name, trigger=model.trigger, target=model.target,
                          poison_rate=model.poison_rate, seed=model.seed, model_args=dict(spec.model_args),
                          epochs=spec.epochs, lr=spec.lr, **STUDY_TRAINING)


def study_model(name: str) -> Path:
    """The folder of a study model, trained on first use (one to five minutes on 2 cores) and cached."""
    spec = STUDY_MODELS[name]
    if spec.bench:
        data = load_images(spec.dataset, split="test")
        trigger = resolve_trigger(spec.trigger, data.image_shape, cache_dir() / "bench" / "triggers")
        _, info = backdoored_model(cache_dir() / "bench", spec.dataset, spec.arch, spec.trigger, trigger, spec.seed,
                                   BenchConfig.quick(), data.image_shape)
        return Path(info["model_dir"])
    return cached_backdoored(study_config(spec), prefix="scan-")


def edit_images(dataset: str, per_class: int = 10, seed: int = 0) -> ImageSet:
    """``per_class`` clean test images per class: what a user hands ``agme scan --data``."""
    data = load_images(dataset)
    return data.subset(balanced_indices(data.labels, per_class, seed=seed))


def detection_cost(num_classes: int, *, img_size: int = 16, steps: int = 200, top_k: int = 2,
                   seed: int = 0) -> dict[str, float]:
    """Seconds of detection over ``num_classes`` classes against one single-class inversion, on a random head.

    A narrow ResNet-10 with random weights (timing only: what it detects means nothing), ``img_size`` pixels,
    two random images per class. Measured in the same process: one inversion, the detection, the inversion
    again; the ratio is against the mean of the two inversions (the load of a shared machine drifts).
    """
    torch.manual_seed(seed)
    model = create_classifier("resnet10t", num_classes=num_classes, in_chans=1, img_size=img_size, mean=(0.5,),
                              std=(0.25,), model_args=SMALL_RESNET).eval()
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), 2)
    images = rng.integers(0, 256, (len(labels), img_size, img_size, 1), dtype=np.uint8)
    data = ImageSet(images, labels, [str(i) for i in range(num_classes)], "random")
    def seconds(run) -> float:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def single_inversion() -> None:
        invert_trigger(model, data, 0, steps=steps, seed=seed)

    before = seconds(single_inversion)
    detection = seconds(lambda: detect_target_fast(model, data, steps=steps, seed=seed, top_k=top_k))
    single = (before + seconds(single_inversion)) / 2
    return {"classes": num_classes, "single_inversion_s": round(single, 2), "detection_s": round(detection, 2),
            "ratio": round(detection / single, 2)}


def study_row(name: str, report: ScanReport, seconds: float, *, backdoor_asr: float | None = None) -> dict[str, object]:
    """One row of the study's table: what was planted, both indices, the verdict and the detected target.

    ``backdoor_asr``: the model's attack success measured when it was trained (``backdoor.json``); a backdoored
    model under ``MIN_BACKDOOR_ASR`` is marked ``took: false``.
    """
    spec = STUDY_MODELS[name]
    took = None if not spec.backdoored or backdoor_asr is None else backdoor_asr >= MIN_BACKDOOR_ASR
    return {"model": name, "arch": spec.arch, "trigger": spec.trigger if spec.backdoored else "none (clean)",
            "backdoored": spec.backdoored, "target": spec.target if spec.backdoored else None,
            "backdoor_asr": None if backdoor_asr is None else round(backdoor_asr, 4), "took": took,
            "development": name in DEVELOPMENT, "patch_index": report.ranking[0].anomaly_index,
            "full_index": report.full_anomaly_index, "full_eps": report.full_eps, "full_success": report.full_success,
            "full_target": report.full_target, "threshold": report.threshold, "verdict": report.verdict,
            "detected": report.target, "right_target": (report.target == spec.target) if spec.backdoored else None,
            "evidence": sorted({e for s in report.suspected for e in s.evidence}), "seconds": round(seconds, 1),
            "patch_ranking": [(r.index, r.mask_l1, r.anomaly_index) for r in report.ranking[:3]]}


def match_models(patterns: list[str]) -> list[str]:
    """Study model names matching ``patterns`` (names or globs), in the study's order; an unmatched one raises."""
    names: list[str] = []
    for pattern in patterns:
        hits = [n for n in STUDY_MODELS if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(f"no study model matches {pattern!r} (e.g. {', '.join(list(STUDY_MODELS)[:3])})")
        names.extend(h for h in hits if h not in names)
    order = {n: i for i, n in enumerate(STUDY_MODELS)}
    return sorted(names, key=order.__getitem__)


def _trained_asr(folder: Path) -> float | None:
    info = json.loads((folder / BACKDOOR_NAME).read_text())
    return info.get("metrics", {}).get("attack_success_rate")


def _accuracy(names: list[str], seeds: list[int]) -> None:
    for name in names:
        spec = STUDY_MODELS[name]
        folder = study_model(name)
        model = load_model(folder)
        asr = _trained_asr(folder) if spec.backdoored else None
        for seed in seeds:  # the draw of D: 10 clean test images per class
            data = edit_images(spec.dataset, seed=seed)
            start = time.perf_counter()
            result = scan_model(model, data)
            row = study_row(name, result, time.perf_counter() - start, backdoor_asr=asr)
            print(json.dumps({**row, "data_seed": seed}), flush=True)


def summarize_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per family and over all: models flagged among the backdoored ones whose backdoor took (TPR), the right
    target detected among them (flagged or not: what ``agme clean`` without a target would edit), and clean
    models flagged (FPR). Rows of a backdoor that did not take are counted apart (``not_taken``)."""
    def tally(group: list[dict[str, object]], family: str) -> dict[str, object]:
        took = [r for r in group if r["backdoored"] and r.get("took") is not False]
        clean = [r for r in group if not r["backdoored"]]
        flagged = sum(r["verdict"] == "backdoor suspected" for r in took)
        return {"family": family, "backdoored": len(took), "flagged": flagged,
                "right_target": sum(bool(r["right_target"]) for r in took),
                "clean": len(clean), "clean_flagged": sum(r["verdict"] == "backdoor suspected" for r in clean),
                "not_taken": sum(r["backdoored"] and r.get("took") is False for r in group)}

    families = list(dict.fromkeys(str(r["arch"]) for r in rows))
    return [tally([r for r in rows if r["arch"] == f], f) for f in families] + [tally(rows, "all")]


def _summary(path: str, patterns: list[str]) -> None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not the output of `accuracy` (one JSON row per line): {err}") from None
    if any(not isinstance(r, dict) or not {"model", "arch", "backdoored", "verdict"} <= r.keys() for r in rows):
        raise UsageError(f"{path} is not the output of `accuracy`: a row lacks model, arch, backdoored or verdict")
    if patterns:  # the rows of some models only, e.g. the bench's ('bench-*') and the clean ones ('*-clean-*')
        rows = [r for r in rows if any(fnmatch.fnmatchcase(str(r["model"]), p) for p in patterns)]
    for entry in summarize_rows(rows):
        print(json.dumps(entry), flush=True)


def _indices(names: list[str], steps: int = 200, batch_size: int = 64) -> None:
    """Both screenings of every class (the budgets detection gives them), and their leaders' MAD index (Neural
    Cleanse's) against the log-Grubbs index (``outlier_scores``): why detection uses the second."""
    for name in names:
        spec = STUDY_MODELS[name]
        model = load_model(study_model(name))
        data = edit_images(spec.dataset)
        classes = list(range(data.num_classes))
        budget = steps * batch_size
        full_budget = int(np.ceil(FULL_SHARE * budget))
        sizes = {"mask": screen_classes(model, data, classes, budget=budget - full_budget).norms,
                 "eps": screen_full(model, data, classes, budget=full_budget).eps}
        print(json.dumps({"model": name, "target": spec.target if spec.backdoored else None, **{
            kind: {"leader": int(np.argmin(v)), "mad_index": round(float(anomaly_indices(v).max()), 3),
                   "log_grubbs_index": round(float(outlier_scores(v).max()), 3)} for kind, v in sizes.items()}}),
              flush=True)


def _option(args: list[str], name: str, default: str) -> tuple[str, list[str]]:
    """The value of ``name VALUE`` in ``args`` (``default`` when absent), and the other arguments."""
    if name not in args:
        return default, args
    at = args.index(name)
    if at + 1 >= len(args):
        raise UsageError(f"{name} needs a value")
    return args[at + 1], args[:at] + args[at + 2:]


def _ints(values: list[str], what: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UsageError(f"{what} must be whole numbers, not {' '.join(values)!r}") from None


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "accuracy"
    if what == "accuracy":  # --seeds 0,1: scan each model with these draws of D
        seeds, args = _option(argv[1:], "--seeds", "0")
        _accuracy(match_models(args) if args else list(STUDY_MODELS), _ints(seeds.split(","), "--seeds"))
    elif what == "summary":  # summary ROWS.jsonl [MODEL-GLOB...]
        if len(argv) < 2:
            raise UsageError("summary needs the rows' file: the output of `accuracy`")
        _summary(argv[1], argv[2:])
    elif what == "indices":
        _indices(match_models(argv[1:]) if argv[1:] else list(DEVELOPMENT))
    elif what == "cost":  # cost [--img-size N] K...
        size, args = _option(argv[1:], "--img-size", "16")
        (px,) = _ints([size], "--img-size")
        for k in _ints(args, "class counts") or [10, 100, 1000]:
            print({**detection_cost(k, img_size=px), "img_size": px}, flush=True)
    else:
        raise UsageError(f"unknown study {what!r}: accuracy, summary, indices or cost")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as err:  # one line and its exit code, as the CLI does
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
