"""The benchmark grid: AGME against the baseline defences, side by side, on real offline data.

``run_bench(BenchConfig.quick(), "bench-out")`` trains (or reuses from the cache) one backdoored timm
model per (dataset, architecture, trigger, seed), then for every clean-image budget runs every defence
on the same images and the same model, and writes ``runs.csv``, ``runs.json``, ``table.md`` and PNG
plots. What is measured, and how:

- The evaluation images are fixed per dataset: ``eval_per_class`` images per class of the test split,
  drawn once with a fixed seed. The clean images a defence may use (its budget, ``per_class`` per class)
  come from the rest of the test split with :func:`agme_hub.data.split_edit_eval` (seeded by the run's
  seed; budgets are nested: the 5 images of a class include the 1). Train and test splits never mix.
- CA, ASR, TA, RA on the evaluation images with the real trigger (also for AGME without backdoor
  knowledge, whose edit used a surrogate); DER as in FT-SAM, against the backdoored model.
- Hyperparameters: never chosen on test data. AGME chooses its layers and lam by cross-validation on
  its own budget; the baselines use their published defaults (and FP its accuracy-drop rule on the
  budget). Every value is recorded with where it came from.
- Knowledge: ``agme-bdk`` gets the true trigger and target; ``agme-nobdk`` and ``nc`` get the target but
  not the trigger (both reconstruct one); ``ft``, ``fp``, ``clp`` and ``ftsam`` get neither.
- Wall seconds of the defence alone: ``time.perf_counter`` around the one call that defends (it
  includes the copy of the model each defence works on; evaluation is outside).
- Peak memory: the memory the defence added at its peak, torch tensors included (``tracemalloc`` would
  miss them), measured in this process after ``gc.collect`` and ``malloc_trim``: the larger of the
  resident-set high-water mark (``VmHWM``, reset with ``/proc/self/clear_refs`` just before) minus the
  resident set at that moment, and the anonymous resident memory (``RssAnon``) sampled every 2 ms minus
  its value at that moment (see :class:`PeakMemory`; the method is recorded in each row).
- The forward-pass floor: seconds of plain forward passes (no hooks, no gradients) over D and T(D) with
  all the augmented copies the engine uses, i.e. the images the edit reads. AGME's edit (its final
  capture + solve) and its whole run are reported against it, and each defence's time against AGME's.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backdoor import BackdoorConfig, train_backdoored
from ..hub.checkpoint import load_model
from ..constants import WEIGHTS_NAME, cache_dir
from ..data import ImageSet, Preprocessor, balanced_indices, load_images, split_edit_eval
from ..errors import UsageError
from ..options import MethodOptions
from ..engine.metrics import Metrics, defense_effectiveness_rating
from ..triggers import PRESETS, Trigger, parse_trigger

__all__ = [
    "ArchSpec", "ARCHS", "TRIGGERS", "DEFENCES", "BenchConfig", "run_bench", "write_outputs", "aggregate",
    "best_per_cell", "headline", "PeakMemory", "forward_floor", "report_partial",
]

# ---------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class ArchSpec:
    """A timm architecture, narrowed for 32 px images, and how the benchmark trains it."""

    timm_name: str
    model_args: dict[str, Any]
    family: str
    batchnorm: bool
    epochs: int = 6
    lr: float = 3e-3


# Small variants: under 1.5 minutes to train on one CPU thread, and a backdoor that takes (ASR > 90 %) with
# 300 images per class (measured on Fashion-MNIST with a BadNets patch). Measured and left out: a narrow ViT
# (patch 4, width 96, depth 4: 12 epochs took 3 minutes for CA 70 %, ASR 75 %) and regnetx_002 (ASR 7 %).
ARCHS: dict[str, ArchSpec] = {
    "resnet10t": ArchSpec("resnet10t", {"channels": [16, 32, 64, 128]}, "ResNet (BatchNorm)", True),
    "convnext": ArchSpec("convnext_atto", {"dims": [24, 48, 96, 192], "depths": [1, 1, 2, 1]},
                         "ConvNeXt (LayerNorm, no BatchNorm)", False),
    "mobilenetv3": ArchSpec("mobilenetv3_small_100", {}, "MobileNetV3 (BatchNorm, depthwise)", True, epochs=10,
                            lr=1e-2),
}

# Name -> trigger spec. ``image`` is written at run time (a seeded noise sticker, semi-transparent).
TRIGGERS: dict[str, str] = {
    **PRESETS,
    "blend": "blend:alpha=0.1,image=noise,seed=0",
    "image": "image",
    "additive": "additive:delta=noise,eps=24/255,seed=0",
    "lsb": "lsb:bits=2,seed=0",
}

# Defence name -> (label, knowledge given, repair).
DEFENCES: dict[str, tuple[str, str, bool | None]] = {
    "agme-bdk": ("AGME, trigger known, repair", "trigger+target", True),
    "agme-bdk-norepair": ("AGME, trigger known, no repair", "trigger+target", False),
    "agme-nobdk": ("AGME, target known, trigger inverted, repair", "target", True),
    "agme-nobdk-norepair": ("AGME, target known, trigger inverted, no repair", "target", False),
    "ft": ("fine-tuning", "none", None),
    "fp": ("fine-pruning", "none", None),
    "clp": ("channel Lipschitzness pruning (data-free)", "none", None),
    "nc": ("Neural Cleanse unlearning, target known", "target", None),
    "ftsam": ("fine-tuning with SAM", "none", None),
}
AGME_DEFENCES = tuple(d for d in DEFENCES if d.startswith("agme"))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark grid: datasets x archs x triggers x seeds x budgets x defences."""

    datasets: tuple[str, ...] = ("fashion-mnist",)
    archs: tuple[str, ...] = ("resnet10t", "convnext")
    triggers: tuple[str, ...] = ("badnets-white-br", "blend")
    budgets: tuple[int, ...] = (1, 10)  # clean images per class given to every defence
    defences: tuple[str, ...] = tuple(DEFENCES)
    seeds: tuple[int, ...] = (0,)
    target: int = 0
    poison_rate: float = 0.1
    n_train: int = 300  # training images per class of the backdoored model
    epochs: int | None = None  # None: the architecture's default
    img_size: int = 32
    eval_per_class: int = 100  # fixed held-out evaluation images per class
    threads: int | None = 1  # torch intra-op threads; None leaves torch's default
    min_asr: float = 0.8  # below: the backdoor did not take; the cell is marked and not defended
    warn_asr: float = 0.9
    model_cache: str | None = None  # None: agme's cache dir / "bench"
    agme_options: dict[str, Any] = field(default_factory=dict)  # extra keywords for agme_hub.clean
    baseline_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per baseline
    name: str = "custom"

    def __post_init__(self) -> None:
        MethodOptions.with_overrides(**self.agme_options)  # an unknown or bad knob fails here, not mid-run
        unknown = [d for d in self.defences if d not in DEFENCES]
        if unknown:
            raise UsageError(f"unknown defence(s) {', '.join(unknown)}: choose from {', '.join(DEFENCES)}")
        if not self.budgets or min(self.budgets) < 1:
            raise UsageError("budgets must be at least 1 image per class")
        if not self.seeds or not self.archs or not self.triggers or not self.datasets:
            raise UsageError("the grid needs at least one dataset, arch, trigger and seed")
        for arch in self.archs:
            _arch_spec(arch)  # raises for an unknown name

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """Under 10 minutes on 2 CPU cores, training included: 2 archs (BatchNorm and not) x 2 triggers x 2 budgets."""
        base = dict(datasets=("fashion-mnist",), archs=("resnet10t", "convnext"), triggers=("badnets-white-br", "blend"),
                    budgets=(1, 10), seeds=(0,), eval_per_class=100, name="quick")
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides: Any) -> "BenchConfig":
        """The issue's grid: 2 datasets x 3 families x 10 triggers x 4 budgets x 9 defences x 3 seeds (hours)."""
        base = dict(datasets=("fashion-mnist", "mnist"), archs=("resnet10t", "convnext", "mobilenetv3"),
                    triggers=tuple(TRIGGERS), budgets=(1, 5, 10, 50), seeds=(0, 1, 2), eval_per_class=200,
                    name="full")
        return cls(**{**base, **overrides})


def _arch_spec(name: str) -> ArchSpec:
    if name in ARCHS:
        return ARCHS[name]
    raise UsageError(f"unknown bench architecture {name!r}: choose from {', '.join(ARCHS)}")


# ---------------------------------------------------------------------------------------------- measuring
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory added by a block, in MiB (``None`` where it cannot be measured).

    Two lower bounds of the true peak, of which the larger is kept: (1) the kernel's high-water mark
    of the resident set, reset on entry (``echo 5 > /proc/self/clear_refs``), minus the resident set at
    entry; (2) the anonymous resident memory (``RssAnon``: heap and tensors, not mapped files), sampled
    every 2 ms by a thread, minus its value at entry. (1) catches peaks too brief to sample but counts
    shared-library pages the kernel drops under memory pressure against the block; (2) does not.
    """

    def __init__(self) -> None:
        self.method = "none"
        self.peak_mb: float | None = None
        self._base_rss = self._base_anon = self._max_anon = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _malloc_trim()
        rss, anon = _status_kb("VmRSS"), _status_kb("RssAnon")
        if rss is None:
            return self
        self._base_rss = rss
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._hwm = True
        except OSError:
            pass
        if anon is not None:
            self._base_anon = self._max_anon = anon
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        methods = (["VmHWM after clear_refs"] if self._hwm else []) + (["RssAnon sampled every 2 ms"] if anon else [])
        self.method = " | ".join(methods) or "none"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            now = _status_kb("RssAnon")
            if now is not None and now > self._max_anon:
                self._max_anon = now

    def __exit__(self, *exc: object) -> None:
        bounds = []
        if self._hwm:
            peak = _status_kb("VmHWM")
            if peak is not None:
                bounds.append(peak - self._base_rss)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            bounds.append(max(self._max_anon, _status_kb("RssAnon") or 0) - self._base_anon)
        self.peak_mb = max(0, max(bounds)) / 1024 if bounds else None


def _engine_default(name: str) -> Any:
    return getattr(MethodOptions(), name)


@torch.inference_mode()
def forward_floor(model: torch.nn.Module, data: ImageSet, trigger: Trigger, *, copies: int | None = None,
                  seed: int = 0) -> tuple[float, int]:
    """Seconds of plain forward passes over D and T(D) with the engine's augmented copies; and the image count.

    The images are the ones the edit reads (same augmentation, same pairing, same batches); building them
    is not timed, only the passes, so this is the floor any method that looks at these activations pays.
    """
    from ..engine.edit import augmented_pairs

    copies = _engine_default("augment_copies") if copies is None else copies
    preprocess = Preprocessor.from_model(model)
    model.eval()
    batches = [torch.cat([preprocess(b.clean), preprocess(b.triggered)])
               for b in augmented_pairs(data.images, data.labels, trigger, copies=copies, seed=seed)]
    start = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - start, sum(len(x) for x in batches)


# ---------------------------------------------------------------------------------------------- models
def _image_trigger_spec(folder: Path, shape: tuple[int, int, int]) -> str:
    """A seeded noise sticker (6x6, 80 % opaque) at the top centre: the general pattern + mask form."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    h, w, c = shape
    rng = np.random.default_rng(5)
    pattern = rng.integers(0, 256, (h, w) if c == 1 else (h, w, c), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    left = (w - 6) // 2
    mask[2:8, left:left + 6] = 204
    pattern_path, mask_path = folder / f"pattern_{h}x{w}x{c}.png", folder / f"mask_{h}x{w}.png"
    Image.fromarray(pattern).save(pattern_path)
    Image.fromarray(mask).save(mask_path)
    return f"image:pattern={pattern_path},mask={mask_path}"


def resolve_trigger(name: str, shape: tuple[int, int, int], folder: Path) -> str:
    """Trigger spec for a bench trigger name (or any spec string, used as given)."""
    spec = TRIGGERS.get(name, name)
    if spec == "image":
        return _image_trigger_spec(folder, shape)
    parse_trigger(spec)  # a bad spec fails here, before any training
    return spec


def _trigger_fingerprint(trigger: Trigger, shape: tuple[int, int, int]) -> str:
    """What the trigger does to fixed probe images: identifies it whatever paths its spec names."""
    probe = np.random.default_rng(0).integers(0, 256, (2,) + shape, dtype=np.uint8)
    probe[1] = 0
    return hashlib.sha256(trigger.apply(probe).tobytes()).hexdigest()[:12]


def _model_folder(cache: Path, dataset: str, arch: str, trigger_name: str, config: BackdoorConfig,
                  fingerprint: str) -> Path:
    record = {**asdict(config), "trigger": fingerprint, "bench_model_version": 1}
    key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]
    safe = trigger_name.replace(":", "_").replace("/", "_").replace(",", "_").replace("=", "-")[:40]
    return cache / f"{dataset}-{arch}-{safe}-s{config.seed}-{key}"


def backdoored_model(cache: Path, dataset: str, arch: str, trigger_name: str, trigger_spec: str, seed: int,
                     config: BenchConfig, shape: tuple[int, int, int]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load from the cache) the backdoored model of one (dataset, arch, trigger, seed)."""
    spec = _arch_spec(arch)
    bd = BackdoorConfig(dataset=dataset, arch=spec.timm_name, trigger=trigger_spec, target=config.target,
                        poison_rate=config.poison_rate, epochs=config.epochs or spec.epochs, seed=seed,
                        n_train=config.n_train, n_test=100, img_size=config.img_size, lr=spec.lr,
                        model_args=dict(spec.model_args))
    folder = _model_folder(cache, dataset, arch, trigger_name, bd, _trigger_fingerprint(parse_trigger(trigger_spec),
                                                                                        shape))
    info_path = folder / "backdoor.json"
    if not (folder / WEIGHTS_NAME).is_file() or not info_path.is_file():
        train_backdoored(bd, out_dir=folder, overwrite=True)
    model = load_model(folder)
    info = json.loads(info_path.read_text())
    return model, {"model_dir": str(folder), "train_seconds": info.get("train_seconds")}


# ---------------------------------------------------------------------------------------------- one cell
def _metrics_row(prefix: str, m: Metrics | None) -> dict[str, float | None]:
    keys = ("clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy")
    short = ("ca", "asr", "ta", "ra")
    return {f"{prefix}{s}": (None if m is None else getattr(m, k)) for s, k in zip(short, keys)}


def _run_defence(name: str, model: torch.nn.Module, edit: ImageSet, trigger_spec: str, target: int, seed: int,
                 config: BenchConfig) -> dict[str, Any]:
    """Run one defence on ``model`` (never modified) with the budget ``edit``; time and memory it."""
    from .baselines import run_baseline
    from ..engine.clean import clean

    out: dict[str, Any] = {}
    if name.startswith("agme"):
        _, knowledge, repair = DEFENCES[name]
        method = MethodOptions(repair=bool(repair), seed=seed, **config.agme_options)
        given = trigger_spec if knowledge == "trigger+target" else None
        with PeakMemory() as mem:
            start = time.perf_counter()
            result = clean(model, edit, trigger=given, target=target, method=method)
            seconds = time.perf_counter() - start
        t = result.timings
        out.update(defended=result.model, applicable=True, reason="", seconds=seconds,
                   agme_capture_seconds=t.capture, agme_solve_seconds=t.solve, agme_edit_seconds=t.capture + t.solve,
                   agme_selection_seconds=t.selection, agme_inversion_seconds=t.inversion,
                   layers=",".join(result.layers), lam=result.lam,
                   hparams={"layers": result.layers, "lam": result.lam, "gamma": result.gamma,
                            "target_weight": result.target_weight, "augment_copies": result.augment_copies,
                            "bn_stats": result.bn_stats, "mode": result.mode, "trigger_used": result.trigger.spec,
                            "chosen_by": result.selection.describe() if result.selection is not None
                            else "given (lam and layers passed)", **config.agme_options})
    else:
        preprocess = Preprocessor.from_model(model)
        images = torch.cat([preprocess(edit.images[i:i + 512]) for i in range(0, len(edit), 512)])
        labels = torch.as_tensor(edit.labels, dtype=torch.long)
        overrides = dict(config.baseline_overrides.get(name, {}))
        if name == "nc":
            overrides.setdefault("target", target)  # the same knowledge as AGME without the trigger
        with PeakMemory() as mem:
            start = time.perf_counter()
            result = run_baseline(name, model, images, labels, seed=seed, **overrides)
            seconds = time.perf_counter() - start
        out.update(defended=result.model, applicable=result.applicable, reason=result.reason, seconds=seconds,
                   hparams=result.hparams)
    out.update(peak_rss_mb=mem.peak_mb, memory_method=mem.method)
    return out


def _cell_rows(model: torch.nn.Module, before: Metrics, edit: ImageSet, evalset: ImageSet, trigger_spec: str,
               base: dict[str, Any], config: BenchConfig, on_row: Callable[[dict[str, Any]], None] | None
               ) -> list[dict[str, Any]]:
    from ..engine.clean import evaluate

    seed = base["seed"]
    floor_seconds, floor_images = forward_floor(model, edit, parse_trigger(trigger_spec), seed=seed,
                                                copies=config.agme_options.get("augment_copies"))
    rows = []
    for name in config.defences:
        label, knowledge, repair = DEFENCES[name]
        row: dict[str, Any] = {**base, "defence": name, "label": label, "knowledge": knowledge, "repair": repair,
                               "floor_seconds": floor_seconds, "floor_images": floor_images}
        try:
            done = _run_defence(name, model, edit, trigger_spec, config.target, seed, config)
        except Exception as err:  # recorded, never hidden: the grid goes on
            row.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            rows.append(row)
            continue
        defended = done.pop("defended")
        row.update(done)
        if done["applicable"] and defended is not None:
            after = evaluate(defended, evalset, trigger_spec, config.target)
            row.update(status="ok", **_metrics_row("", after), der=defense_effectiveness_rating(before, after))
        else:
            row.update(status="not applicable")
        if name.startswith("agme"):
            row["edit_over_floor"] = row["agme_edit_seconds"] / floor_seconds if floor_seconds > 0 else None
            row["total_over_floor"] = row["seconds"] / floor_seconds if floor_seconds > 0 else None
        rows.append(row)
        del defended
    ref = {r["defence"]: r.get("seconds") for r in rows if r.get("status") == "ok"}
    for row in rows:
        for key, agme in (("time_vs_agme_bdk", "agme-bdk"), ("time_vs_agme_nobdk", "agme-nobdk")):
            row[key] = (row["seconds"] / ref[agme] if row.get("seconds") is not None and ref.get(agme) else None)
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------------------------------------- the run
def _environment(config: BenchConfig) -> dict[str, Any]:
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "machine": platform.machine(), "processor": platform.processor() or "",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "platform": platform.platform()}


def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["dataset"], row["arch"], row["trigger"], row["seed"], row["per_class"])


def run_bench(config: BenchConfig, out_dir: str | os.PathLike[str], on_row: Callable[[dict[str, Any]], None] | None = None,
              *, command: str | None = None, resume: bool = True,
              say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run the grid; write runs.csv, runs.json, table.md and plots into ``out_dir``; return every row.

    Rows are also appended to ``out_dir/runs.partial.jsonl`` as they come; with ``resume`` a cell (one
    dataset, arch, trigger, seed and budget) already complete there with the same grid settings is not run
    again, so an interrupted grid picks up where it stopped.
    """
    say = say or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    cache = Path(config.model_cache) if config.model_cache else cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    partial = out / "runs.partial.jsonl"
    # Rows from an earlier run count when everything but the grid's axes matches: a grid extended with more
    # seeds, budgets, triggers or archs reuses the cells it already has.
    axes = {"name", "model_cache", "datasets", "archs", "triggers", "budgets", "seeds", "defences"}
    settings = {k: v for k, v in asdict(config).items() if k not in axes}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    done: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    if resume and partial.is_file():
        for line in partial.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("grid") == fingerprint:
                    done.setdefault(_cell_key(row), []).append(row)
        done = {k: v for k, v in done.items() if {r["defence"] for r in v} >= set(config.defences)}
    elif partial.exists():
        partial.unlink()

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    backdoors: list[dict[str, Any]] = []
    reused = 0

    def emit(row: dict[str, Any]) -> None:
        row["grid"] = fingerprint
        with open(partial, "a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if on_row is not None:
            on_row(row)

    try:
        for dataset in config.datasets:
            test = load_images(dataset, split="test")
            shape = test.image_shape
            eval_idx = balanced_indices(test.labels, config.eval_per_class, seed=10_007)
            evalset = test.subset(eval_idx, f"{dataset}:test (held out)")
            pool = test.subset(np.setdiff1d(np.arange(len(test)), eval_idx), f"{dataset}:test (budget pool)")
            for trigger_name in config.triggers:  # triggers outside archs: a stopped grid covers every arch
                trigger_spec = resolve_trigger(trigger_name, shape, out / "triggers")
                for arch in config.archs:
                    for seed in config.seeds:
                        keys = [(dataset, arch, trigger_name, seed, b) for b in config.budgets]
                        if all(k in done for k in keys):
                            for k in keys:
                                rows.extend(done[k])
                            reused += len(keys)
                            backdoors.append(_backdoor_from_rows(done[keys[0]][0]))
                            continue
                        say(f"{dataset} {arch} {trigger_name} seed {seed}: training or loading the backdoored model")
                        model, info = backdoored_model(cache, dataset, arch, trigger_name, trigger_spec, seed, config,
                                                       shape)
                        from ..engine.clean import evaluate

                        before = evaluate(model, evalset, trigger_spec, config.target)
                        asr = before.attack_success_rate or 0.0
                        backdoor = {"dataset": dataset, "arch": arch, "timm_arch": _arch_spec(arch).timm_name,
                                    "family": _arch_spec(arch).family, "trigger": trigger_name,
                                    "trigger_spec": trigger_spec, "seed": seed, **_metrics_row("backdoor_", before),
                                    "backdoor_ok": asr >= config.min_asr, "train_seconds": info["train_seconds"],
                                    "n_train_per_class": config.n_train, "poison_rate": config.poison_rate}
                        backdoors.append(backdoor)
                        if asr < config.warn_asr:
                            say(f"  warning: the backdoor's ASR is {asr:.1%} (< {config.warn_asr:.0%})")
                        for per_class, key in zip(config.budgets, keys):
                            if key in done:
                                rows.extend(done[key])
                                reused += 1
                                continue
                            edit, _ = split_edit_eval(pool, per_class, seed=seed)
                            base = {**backdoor, "per_class": per_class, "n_edit": len(edit),
                                    "n_eval": len(evalset), "target": config.target}
                            if not backdoor["backdoor_ok"]:
                                for name in config.defences:
                                    label, knowledge, repair = DEFENCES[name]
                                    row = {**base, "defence": name, "label": label, "knowledge": knowledge,
                                           "repair": repair, "status": "backdoor not learned",
                                           **_metrics_row("", None), "der": None, "seconds": None,
                                           "reason": f"ASR {asr:.1%} < {config.min_asr:.0%}: not defended"}
                                    emit(row)
                                    rows.append(row)
                                continue
                            say(f"  {per_class} image(s) per class: {', '.join(config.defences)}")
                            rows.extend(_cell_rows(model, before, edit, evalset, trigger_spec, base, config, emit))
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - started
    write_outputs(rows, out, config=config, backdoors=backdoors, command=command, elapsed=elapsed, reused=reused)
    return rows


def report_partial(out_dir: str | os.PathLike[str], *, command: str | None = None) -> dict[str, Path]:
    """Write the table and plots from the rows an unfinished run left in ``out_dir/runs.partial.jsonl``."""
    out = Path(out_dir)
    rows = [json.loads(line) for line in (out / "runs.partial.jsonl").read_text().splitlines() if line.strip()]
    backdoors = list({(r["dataset"], r["arch"], r["trigger"], r["seed"]): _backdoor_from_rows(r) for r in rows}.values())
    return write_outputs(rows, out, backdoors=backdoors, command=command)


def _backdoor_from_rows(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("dataset", "arch", "timm_arch", "family", "trigger", "trigger_spec", "seed", "backdoor_ca", "backdoor_asr",
            "backdoor_ta", "backdoor_ra", "backdoor_ok", "train_seconds", "n_train_per_class", "poison_rate")
    return {k: row.get(k) for k in keys}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- reporting
CSV_COLUMNS = [
    "dataset", "arch", "timm_arch", "family", "trigger", "seed", "per_class", "n_edit", "n_eval", "target",
    "defence", "knowledge", "repair", "status", "reason", "backdoor_ok", "backdoor_ca", "backdoor_asr", "backdoor_ta",
    "backdoor_ra", "ca", "asr", "ta", "ra", "der", "seconds", "peak_rss_mb", "memory_method", "floor_seconds",
    "floor_images", "agme_edit_seconds", "agme_capture_seconds", "agme_solve_seconds", "agme_selection_seconds",
    "agme_inversion_seconds", "edit_over_floor", "total_over_floor", "time_vs_agme_bdk", "time_vs_agme_nobdk",
    "layers", "lam", "train_seconds", "trigger_spec", "hparams",
]
CELL = ("dataset", "arch", "trigger", "per_class")
METRICS = ("ca", "asr", "ta", "ra", "der", "seconds", "peak_rss_mb")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every (dataset, arch, trigger, budget, defence), in grid order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in CELL) + (row["defence"],), []).append(row)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        statuses = sorted({r.get("status", "") for r in members})
        agg: dict[str, Any] = dict(zip(CELL + ("defence",), key))
        agg.update(knowledge=members[0].get("knowledge"), seeds=len(members), ok=len(ok),
                   status="ok" if ok else (statuses[0] if statuses else ""),
                   reason=next((r.get("reason") for r in members if r.get("reason")), ""),
                   backdoor_ok=all(r.get("backdoor_ok", True) for r in members),
                   backdoor_asr=_mean_std([r.get("backdoor_asr") for r in members])[0],
                   backdoor_ca=_mean_std([r.get("backdoor_ca") for r in members])[0],
                   backdoor_ta=_mean_std([r.get("backdoor_ta") for r in members])[0])
        for metric in METRICS:
            agg[metric], agg[f"{metric}_std"] = _mean_std([r.get(metric) for r in ok])
        out.append(agg)
    return out


def _rank_key(agg: dict[str, Any]) -> tuple[float, float]:
    return (agg["der"] if agg["der"] is not None else -1.0, agg["ca"] if agg["ca"] is not None else -1.0)


def best_per_cell(aggregated: Iterable[dict[str, Any]], *, exclude_knowledge: tuple[str, ...] = ()
                  ) -> dict[tuple[Any, ...], str]:
    """The defence with the highest mean DER (then CA) in each cell; ``exclude_knowledge`` drops some defences."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for agg in aggregated:
        if agg["status"] != "ok" or agg["der"] is None or agg["knowledge"] in exclude_knowledge:
            continue
        key = tuple(agg[k] for k in CELL)
        if key not in best or _rank_key(agg) > _rank_key(best[key]):
            best[key] = agg
    return {k: v["defence"] for k, v in best.items()}


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def _num(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per defence, over every cell whose backdoor took: means, wins, and time against AGME."""
    aggregated = [a for a in aggregate(rows) if a["backdoor_ok"]]
    winners = best_per_cell(aggregated)
    winners_blind = best_per_cell(aggregated, exclude_knowledge=("trigger+target",))
    cells = {tuple(a[k] for k in CELL) for a in aggregated}
    ok_rows = [r for r in rows if r.get("status") == "ok" and r.get("backdoor_ok")]
    order = [d for d in DEFENCES if any(a["defence"] == d for a in aggregated)]
    out = []
    for name in order:
        mine = [a for a in aggregated if a["defence"] == name]
        ok = [a for a in mine if a["status"] == "ok"]
        raw = [r for r in ok_rows if r["defence"] == name]
        ratios = [r["time_vs_agme_bdk"] for r in raw if r.get("time_vs_agme_bdk") is not None]
        ratios_nobdk = [r["time_vs_agme_nobdk"] for r in raw if r.get("time_vs_agme_nobdk") is not None]
        out.append({
            "defence": name, "label": DEFENCES[name][0], "knowledge": DEFENCES[name][1], "cells": len(mine),
            "applicable": len(ok),
            "ca_change": _mean_std([a["ca"] - a["backdoor_ca"] for a in ok if a["backdoor_ca"] is not None])[0],
            "ta_change": _mean_std([a["ta"] - a["backdoor_ta"] for a in ok
                                    if a["ta"] is not None and a["backdoor_ta"] is not None])[0],
            "asr": _mean_std([a["asr"] for a in ok])[0], "ta": _mean_std([a["ta"] for a in ok])[0],
            "ra": _mean_std([a["ra"] for a in ok])[0], "der": _mean_std([a["der"] for a in ok])[0],
            "asr_below_10": sum(1 for a in ok if a["asr"] is not None and a["asr"] < 0.10),
            "wins": sum(1 for k in cells if winners.get(k) == name),
            "wins_without_trigger": sum(1 for k in cells if winners_blind.get(k) == name),
            "median_seconds": statistics.median([r["seconds"] for r in raw]) if raw else None,
            "median_peak_mb": statistics.median([r["peak_rss_mb"] for r in raw if r.get("peak_rss_mb") is not None])
            if any(r.get("peak_rss_mb") is not None for r in raw) else None,
            "time_vs_agme_bdk": statistics.median(ratios) if ratios else None,
            "time_vs_agme_nobdk": statistics.median(ratios_nobdk) if ratios_nobdk else None,
        })
    return out


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def headline_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The compact table the README shows."""
    body = []
    for h in headline(rows):
        body.append([f"`{h['defence']}`", h["knowledge"], f"{h['applicable']}/{h['cells']}",
                     f"{100 * h['ca_change']:+.1f}" if h["ca_change"] is not None else "-",
                     _pct(h["asr"]), f"{100 * h['ta_change']:+.1f}" if h["ta_change"] is not None else "-",
                     _pct(h["ra"]), _num(h["der"]),
                     f"{h['asr_below_10']}", f"{h['wins']}", f"{h['wins_without_trigger']}",
                     _secs(h["median_seconds"]), _num(h["median_peak_mb"], digits=0),
                     _num(h["time_vs_agme_bdk"]), _num(h["time_vs_agme_nobdk"])])
    header = ["defence", "knows", "cells run", "CA change (pt)", "ASR %", "TA change (pt)", "RA %", "DER",
              "cells ASR<10%", "best DER", "best DER w/o trigger", "median s", "median peak MiB",
              "time / agme-bdk", "time / agme-nobdk"]
    return _markdown_table(header, body)


def _timing_markdown(rows: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["defence"] in ("agme-bdk", "agme-nobdk"):
            groups.setdefault((r["dataset"], r["arch"], r["per_class"], r["defence"]), []).append(r)
    body = []
    for (dataset, arch, per_class, defence), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                               kv[0][2], kv[0][3])):
        def med(key: str) -> float | None:
            values = [m[key] for m in members if m.get(key) is not None]
            return statistics.median(values) if values else None

        body.append([dataset, arch, str(per_class), defence, str(int(med("floor_images") or 0)), _secs(med("floor_seconds")),
                     _secs(med("agme_edit_seconds")), _secs(med("agme_solve_seconds")),
                     _num(med("edit_over_floor")), _secs(med("agme_selection_seconds")),
                     _secs(med("agme_inversion_seconds")), _secs(med("seconds")), _num(med("total_over_floor"))])
    header = ["dataset", "arch", "img/class", "defence", "floor images", "floor s", "edit s (capture+solve)",
              "solve s", "edit / floor", "selection (CV) s", "inversion s", "total s", "total / floor"]
    return _markdown_table(header, body)


def _per_budget_markdown(rows: list[dict[str, Any]]) -> list[str]:
    aggregated = [a for a in aggregate(rows) if a["backdoor_ok"] and a["status"] == "ok"]
    budgets = sorted({a["per_class"] for a in aggregated})
    body = []
    for arch in dict.fromkeys(a["arch"] for a in aggregated):
        for name in DEFENCES:
            mine = [a for a in aggregated if a["arch"] == arch and a["defence"] == name]
            if not mine:
                continue
            cells = []
            for b in budgets:
                at = [a for a in mine if a["per_class"] == b]
                asr = _mean_std([a["asr"] for a in at])[0]
                ca = _mean_std([a["ca"] for a in at])[0]
                der = _mean_std([a["der"] for a in at])[0]
                cells.append("-" if asr is None else f"{_pct(asr)} / {_pct(ca)} / {_num(der)}")
            body.append([arch, f"`{name}`"] + cells)
    return _markdown_table(["arch", "defence"] + [f"{b}/class: ASR / CA / DER" for b in budgets], body)


def _cell_markdown(rows: list[dict[str, Any]]) -> list[str]:
    aggregated = aggregate(rows)
    winners = best_per_cell([a for a in aggregated if a["backdoor_ok"]])
    winners_blind = best_per_cell([a for a in aggregated if a["backdoor_ok"]], exclude_knowledge=("trigger+target",))
    body = []
    not_learned_shown = set()
    for a in aggregated:
        key = tuple(a[k] for k in CELL)
        if not a["backdoor_ok"]:  # one line per cell, not one per defence
            if key not in not_learned_shown:
                not_learned_shown.add(key)
                body.append([a["dataset"], a["arch"], a["trigger"], str(a["per_class"]), "(all)",
                             f"backdoor not learned: {(a['reason'] or '').replace('|', '/')[:90]}", "", "", "", "",
                             "", ""])
            continue
        name = f"`{a['defence']}`"
        marks = ("★" if winners.get(key) == a["defence"] else "") + ("†" if winners_blind.get(key) == a["defence"] else "")
        if marks:
            name = f"**{name}** {marks}"
        if a["status"] != "ok":
            what = "backdoor not learned" if not a["backdoor_ok"] else a["status"]
            detail = (a["reason"] or "").replace("|", "/")[:90]
            body.append([a["dataset"], a["arch"], a["trigger"], str(a["per_class"]), name, f"{what}: {detail}", "", "",
                         "", "", "", ""])
            continue
        body.append([a["dataset"], a["arch"], a["trigger"], str(a["per_class"]), name, _pct(a["ca"], a["ca_std"]),
                     _pct(a["asr"], a["asr_std"]), _pct(a["ta"], a["ta_std"]), _pct(a["ra"], a["ra_std"]),
                     _num(a["der"], a["der_std"]), _secs(a["seconds"]), _num(a["peak_rss_mb"], digits=0)])
    return _markdown_table(["dataset", "arch", "trigger", "img/class", "defence", "CA %", "ASR %", "TA %", "RA %",
                            "DER", "s", "peak MiB"], body)


def _layers_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """How often cross-validation chose each layer group and lam, per arch and AGME variant."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for r in rows:
        if r.get("status") == "ok" and r["defence"].startswith("agme") and r.get("backdoor_ok"):
            key = (r["arch"], r["defence"], r.get("layers") or "-", f"{r['lam']:g}" if r.get("lam") is not None else "-")
            counts[key] = counts.get(key, 0) + 1
    body = [[arch, f"`{d}`", f"`{layers}`", lam, str(n)] for (arch, d, layers, lam), n in sorted(counts.items())]
    return _markdown_table(["arch", "defence", "layers edited", "lam", "runs"], body)


def _backdoor_markdown(backdoors: list[dict[str, Any]]) -> list[str]:
    body = [[b["dataset"], b["arch"], b["trigger"], str(b["seed"]), _pct(b["backdoor_ca"]), _pct(b["backdoor_asr"]),
             _pct(b["backdoor_ta"]), "yes" if b["backdoor_ok"] else "**no**", _secs(b.get("train_seconds"))]
            for b in backdoors]
    return _markdown_table(["dataset", "arch", "trigger", "seed", "CA %", "ASR %", "TA %", "backdoor took",
                            "train s"], body)


def _win_loss_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Per cell: AGME's DER against the best baseline's (same knowledge or less), win or loss, no filtering."""
    aggregated = [a for a in aggregate(rows) if a["backdoor_ok"] and a["status"] == "ok"]
    cells: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for a in aggregated:
        cells.setdefault(tuple(a[k] for k in CELL), {})[a["defence"]] = a
    body = []
    tally = {"agme-bdk": [0, 0], "agme-nobdk": [0, 0]}
    ta_lower = {"agme-bdk": 0, "agme-nobdk": 0}
    for key, by in cells.items():
        baselines = {d: a for d, a in by.items() if not d.startswith("agme")}
        if not baselines:
            continue
        best_name = max(baselines, key=lambda d: _rank_key(baselines[d]))
        best = baselines[best_name]
        line = [*map(str, key), f"`{best_name}` {_num(best['der'])} (ASR {_pct(best['asr'])}, CA {_pct(best['ca'])}, "
                                f"TA {_pct(best['ta'])})"]
        for agme in ("agme-bdk", "agme-nobdk"):
            a = by.get(agme)
            if a is None:
                line.append("-")
                continue
            win = _rank_key(a) > _rank_key(best)
            tally[agme][0 if win else 1] += 1
            if a["ta"] is not None and best["ta"] is not None and a["ta"] < best["ta"]:
                ta_lower[agme] += 1
            line.append(f"{'win' if win else 'loss'}: {_num(a['der'])} (ASR {_pct(a['asr'])}, CA {_pct(a['ca'])}, "
                        f"TA {_pct(a['ta'])})")
        body.append(line)
    lines = _markdown_table(["dataset", "arch", "trigger", "img/class", "best baseline: DER", "agme-bdk", "agme-nobdk"],
                            body)
    summary = [f"`{k}` beats the best baseline on DER in {w} of {w + l} cells and loses in {l}; its target-class "
               f"accuracy (TA, which DER ignores) is below that baseline's in {ta_lower[k]} of the {w + l}."
               for k, (w, l) in tally.items() if w + l]
    return summary + [""] + lines


def write_outputs(rows: list[dict[str, Any]], out_dir: str | os.PathLike[str], *, config: BenchConfig | None = None,
                  backdoors: list[dict[str, Any]] | None = None, command: str | None = None,
                  elapsed: float | None = None, reused: int = 0) -> dict[str, Path]:
    """Write runs.csv, runs.json, table.md and the PNG plots; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backdoors = backdoors or []
    paths = {"csv": out / "runs.csv", "json": out / "runs.json", "table": out / "table.md"}
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in CSV_COLUMNS}
            flat["hparams"] = json.dumps(row.get("hparams"), default=_json_default, sort_keys=True) if row.get("hparams") else ""
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat.items()})
    record = {"command": command, "config": asdict(config) if config else None, "elapsed_seconds": elapsed,
              "cells_reused_from_earlier_run": reused,
              "environment": _environment(config) if config else None, "defences": {k: {"label": v[0], "knowledge": v[1],
              "repair": v[2]} for k, v in DEFENCES.items()}, "backdoors": backdoors,
              "headline": headline(rows), "rows": rows}
    paths["json"].write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    paths.update(plot(rows, out))

    lines = ["# agme bench results", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if config is not None:
        lines += [f"Grid `{config.name}`: datasets {', '.join(config.datasets)}; archs {', '.join(config.archs)}; "
                  f"triggers {', '.join(config.triggers)}; budgets {', '.join(map(str, config.budgets))} clean "
                  f"images per class; seeds {', '.join(map(str, config.seeds))}; target class {config.target}; "
                  f"poison rate {config.poison_rate:g}; {config.n_train} training images per class; "
                  f"{config.eval_per_class} held-out evaluation images per class; torch threads "
                  f"{config.threads or 'default'}.", ""]
    if elapsed is not None:
        env = _environment(config) if config else {}
        what = (f"this invocation, which reused {reused} finished cell(s) from an earlier one in the same folder"
                if reused else "the whole run, training included")
        lines += [f"Wall time of {what}: {elapsed / 60:.1f} min on {env.get('cpu_count', '?')} CPU(s) "
                  f"({env.get('platform', '')}; torch {env.get('torch', '')}, timm {env.get('timm', '')}).", ""]
    lines += [
        "Knowledge: `agme-bdk*` get the true trigger and the target; `agme-nobdk*` and `nc` get the target only "
        "(each reconstructs a trigger); `ft`, `fp`, `clp`, `ftsam` get neither. All defences get the same clean "
        "images and the same backdoored model. Hyperparameters: AGME by cross-validation on its budget, baselines "
        "at their published defaults (recorded per run in runs.json); no test ASR chooses anything. ASR is always "
        "measured with the real trigger, on held-out images whose true class is not the target. "
        "DER = (max(0, ΔASR) − max(0, ΔCA) + 1) / 2 against the backdoored model. Seconds: wall time of the "
        "defence alone; peak MiB: resident memory the defence added at its peak (see `agme_hub/bench.py`).", "",
        "## Headline (all cells whose backdoor took; means over cells)", "",
        *headline_markdown(rows), "",
        "`best DER`: cells where this defence had the highest mean DER (ties: higher CA); `best DER w/o trigger`: "
        "the same among defences not given the trigger.", "",
        "## AGME against the best baseline, cell by cell", "",
        *_win_loss_markdown(rows), "",
        "## By budget (mean over triggers and seeds)", "",
        *_per_budget_markdown(rows), "",
        "## Time: AGME's edit against the forward-pass floor", "",
        "Floor: plain forward passes over D and T(D) with the engine's augmented copies (the images the edit "
        "reads). Edit: the final capture + solve; total: the whole `agme_hub.clean` call, with cross-validated "
        "selection and (no-BDK) trigger inversion. Medians over triggers and seeds.", "",
        *_timing_markdown(rows), "",
        "## Layers and lam chosen by AGME's cross-validation (on the clean budget only)", "",
        *_layers_markdown(rows), "",
        "## Backdoored models (on the held-out evaluation images)", "",
        *_backdoor_markdown(backdoors), "",
        "## Every cell (mean ± std over seeds)", "",
        "★ best DER in the cell; † best DER among defences not given the trigger.", "",
        *_cell_markdown(rows), "",
        "Plots: `asr_vs_budget.png`, `ca_vs_budget.png`, `time_per_defence.png`, `agme_edit_vs_floor.png`.", "",
    ]
    paths["table"].write_text("\n".join(lines))
    return paths


# ---------------------------------------------------------------------------------------------- plots
_STYLE = {"agme-bdk": ("C0", "-", "o"), "agme-bdk-norepair": ("C0", "--", "o"), "agme-nobdk": ("C1", "-", "s"),
          "agme-nobdk-norepair": ("C1", "--", "s"), "ft": ("C2", "-", "^"), "fp": ("C3", "-", "v"),
          "clp": ("C4", "-", "D"), "nc": ("C5", "-", "P"), "ftsam": ("C6", "-", "X")}


def plot(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """ASR and CA against images per class (one panel per arch), time per defence, AGME edit vs floor."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("backdoor_ok")]
    archs = list(dict.fromkeys(r["arch"] for r in rows)) or ["-"]
    budgets = sorted({r["per_class"] for r in rows}) or [1]
    defences = [d for d in DEFENCES if any(r["defence"] == d for r in ok)]
    paths: dict[str, Path] = {}
    for metric, title in (("asr", "attack success rate (%)"), ("ca", "clean accuracy (%)")):
        fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False, sharey=True)
        for ax, arch in zip(axes[0], archs):
            for name in defences:
                xs, ys = [], []
                for b in budgets:
                    values = [r[metric] for r in ok if r["arch"] == arch and r["defence"] == name and r["per_class"] == b
                              and r.get(metric) is not None]
                    if values:
                        xs.append(b)
                        ys.append(100 * statistics.fmean(values))
                if xs:
                    colour, line, marker = _STYLE.get(name, ("k", "-", "."))
                    ax.plot(xs, ys, color=colour, linestyle=line, marker=marker, label=name)
            if metric == "ca":
                before = [r["backdoor_ca"] for r in ok if r["arch"] == arch and r.get("backdoor_ca") is not None]
                if before:
                    ax.axhline(100 * statistics.fmean(before), color="grey", linestyle=":", label="backdoored")
            ax.set_xscale("log")
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_title(arch)
            ax.set_xlabel("clean images per class")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(title)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            h, l = ax.get_legend_handles_labels()
            for hh, ll in zip(h, l):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.suptitle(f"{title} after the defence (mean over triggers, seeds, datasets)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_budget.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[f"{metric}_plot"] = path

    # Time per defence: median seconds at each budget, log scale, with the forward-pass floor.
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(defences) + 2), 3.8))
    width = 0.8 / max(1, len(budgets))
    for i, b in enumerate(budgets):
        heights = []
        for name in defences:
            values = [r["seconds"] for r in ok if r["defence"] == name and r["per_class"] == b]
            heights.append(statistics.median(values) if values else 0.0)
        ax.bar(np.arange(len(defences)) + (i - (len(budgets) - 1) / 2) * width, heights, width, label=f"{b}/class")
        floors = [r["floor_seconds"] for r in ok if r["per_class"] == b and r.get("floor_seconds")]
        if floors:
            ax.axhline(statistics.median(floors), color=f"C{i}", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(defences)))
    ax.set_xticklabels(defences, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("wall seconds of the defence (median)")
    ax.set_title("time per defence; dotted: forward-pass floor of the edit at that budget", fontsize=10)
    if defences:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out_dir / "time_per_defence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["time_plot"] = path

    # AGME's edit and whole run against the floor, per budget.
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label, style in (("floor_seconds", "forward-pass floor", ":"), ("agme_edit_seconds", "edit (capture+solve)", "-"),
                              ("agme_selection_seconds", "selection (CV)", "--"), ("seconds", "agme-bdk total", "-.")):
        xs, ys = [], []
        for b in budgets:
            values = [r[key] for r in ok if r["defence"] == "agme-bdk" and r["per_class"] == b and r.get(key) is not None]
            if values:
                xs.append(b)
                ys.append(statistics.median(values))
        if xs:
            ax.plot(xs, ys, linestyle=style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("clean images per class")
    ax.set_ylabel("seconds (median over cells)")
    ax.set_title("AGME (trigger known) against its forward-pass floor", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "agme_edit_vs_floor.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["floor_plot"] = path
    return paths


def config_with(base: BenchConfig, **changes: Any) -> BenchConfig:
    """``base`` with some fields replaced (None values are ignored): how the CLI applies its overrides."""
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
