"""Train backdoored models (all-to-one poisoning) for tests, benchmarks and the demo: timm, transformers, any module.

``train_backdoored(BackdoorConfig(dataset="fashion-mnist", arch="resnet18", trigger="badnets-white-br"))``
poisons a fraction of the non-target training images with the trigger, relabels them to the target,
trains, measures clean accuracy and attack success on the test split, and can write a timm folder that
``timm.create_model("local-dir:...")`` loads.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import WEIGHTS_NAME, cache_dir
from ..data import ImageSet, Preprocessor, balanced_indices, load_images
from ..devices import model_device, resolve_device
from ..engine.classifier import as_classifier
from ..engine.metrics import Metrics, measure
from ..errors import ClassMismatchError, UsageError
from ..hub.checkpoint import atomic_output_dir, save_model
from ..hub.transformers_format import create_transformers_classifier
from ..triggers import parse_trigger

__all__ = ["BackdoorConfig", "BackdoorResult", "BACKDOOR_NAME", "create_classifier", "poison", "train_backdoored",
           "cached_backdoored"]

BACKDOOR_NAME = "backdoor.json"  # what was planted, written beside the weights of a trained model


@dataclass(frozen=True)
class BackdoorConfig:
    """What to train: any timm architecture at the dataset's classes, with an all-to-one backdoor.

    With ``format="transformers"``, ``arch`` is a tiny transformers family (``vit``, ``convnext``, ``resnet``, see
    :data:`agme_hub.transformers_format.TINY_CONFIGS`) or a ``...ForImageClassification`` class name, and
    ``model_args`` go to its config.
    """

    dataset: str = "fashion-mnist"
    arch: str = "resnet18"
    trigger: str = "badnets-white-br"
    target: int = 0
    poison_rate: float = 0.1
    epochs: int = 2
    seed: int = 0
    n_train: int | None = None  # images per class of the train split; None = all
    n_test: int | None = 200  # images per class for the metrics; None = all
    img_size: int = 32
    batch_size: int = 128
    lr: float = 2e-3
    model_args: dict[str, Any] = field(default_factory=dict)
    format: str = "timm"  # or "transformers"


@dataclass
class BackdoorResult:
    model: torch.nn.Module
    config: BackdoorConfig
    label_names: list[str]
    metrics: Metrics
    train_seconds: float
    out_dir: Path | None = None


def create_classifier(arch: str, *, num_classes: int, in_chans: int, img_size: int, mean: tuple[float, ...],
                      std: tuple[float, ...], model_args: dict[str, Any] | None = None) -> torch.nn.Module:
    """A timm model with a pretrained_cfg that describes how to preprocess its input.

    ``crop_pct`` is 1.0 so that corner triggers are never cropped away at evaluation.
    """
    import timm

    args = {"num_classes": num_classes, "in_chans": in_chans, **(model_args or {})}
    try:
        default_cfg = timm.get_pretrained_cfg(arch)
    except RuntimeError:
        default_cfg = None
    if default_cfg is not None and default_cfg.fixed_input_size:
        args.setdefault("img_size", img_size)
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except RuntimeError as err:
        raise UsageError(f"timm cannot build {arch!r}: {str(err).splitlines()[0]}") from None
    cfg = dict(model.pretrained_cfg)
    for key in ("url", "hf_hub_id", "file", "license", "paper_ids", "origin_url", "tag", "test_input_size",
                "test_crop_pct"):
        cfg.pop(key, None)  # trained from scratch here: no weights, paper or license to point at
    cfg.update(input_size=(in_chans, img_size, img_size), mean=tuple(mean), std=tuple(std), crop_pct=1.0,
               crop_mode="center", interpolation="bilinear", num_classes=num_classes, architecture=arch)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    model.model_args = args  # type: ignore[attr-defined]
    return model


def poison(data: ImageSet, trigger_spec: str, target: int, rate: float, *, seed: int) -> tuple[ImageSet, np.ndarray]:
    """Stamp ``rate`` of the non-target images and relabel them to ``target``; returns the indices."""
    trigger = parse_trigger(trigger_spec)
    candidates = np.flatnonzero(data.labels != target)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=int(round(rate * len(data))), replace=False))
    images, labels = data.images.copy(), data.labels.copy()
    images[chosen] = trigger.apply(images[chosen])
    labels[chosen] = target
    return ImageSet(images, labels, list(data.label_names), f"{data.name} (poisoned)"), chosen


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), disable=not enabled, transient=True)


def train_backdoored(config: BackdoorConfig, *, out_dir: str | Path | None = None, progress: bool = False,
                     overwrite: bool = False, model: torch.nn.Module | None = None,
                     preprocess: Preprocessor | None = None, device: str | None = None) -> BackdoorResult:
    """Train a backdoored model; write it (timm or transformers format) when ``out_dir`` is given.

    ``model`` trains your own module instead of building ``config.arch`` (any ``nn.Module`` mapping images to
    logits; ``preprocess`` says how raw images become its input). Such a model is not written to ``out_dir``.
    ``device`` is where it trains (``None``: the CPU); not a field of the config, so that cached models keep
    their keys. The returned model is back on the CPU (a given model: where it was).
    """
    run_on = resolve_device(device) if device is not None else torch.device("cpu")
    if config.format not in {"timm", "transformers"}:
        raise UsageError(f"format must be timm or transformers, got {config.format!r}")
    if model is not None and out_dir is not None:
        raise UsageError("a model given as a module has no file format: train it without out_dir and save it yourself")
    if not 0.0 <= config.poison_rate < 1.0:
        raise UsageError(f"poison rate must be in [0, 1), got {config.poison_rate}")
    if config.epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {config.epochs}")
    trigger = parse_trigger(config.trigger)
    train = load_images(config.dataset, split="train")
    test = load_images(config.dataset, split="test")
    if not 0 <= config.target < train.num_classes:
        raise ClassMismatchError(f"target class {config.target} is out of range: {config.dataset} has "
                                 f"{train.num_classes} classes (0..{train.num_classes - 1})")
    if config.n_train is not None:
        train = train.subset(balanced_indices(train.labels, config.n_train, seed=config.seed))
    if config.n_test is not None:
        test = test.subset(balanced_indices(test.labels, config.n_test, seed=config.seed))
    poisoned, _ = poison(train, config.trigger, config.target, config.poison_rate, seed=config.seed)

    torch.manual_seed(config.seed)
    in_chans = train.image_shape[2]
    unit = train.images.astype(np.float32) / 255.0
    mean = tuple(float(m) for m in unit.mean(axis=(0, 1, 2)))
    std = tuple(float(s) for s in unit.std(axis=(0, 1, 2)))
    given = model
    if model is not None:
        model = as_classifier(model, preprocess=preprocess)
    elif config.format == "transformers":
        model = create_transformers_classifier(config.arch, num_classes=train.num_classes, img_size=config.img_size,
                                               mean=mean, std=std, label_names=list(train.label_names),
                                               model_args=config.model_args)
    else:
        model = create_classifier(config.arch, num_classes=train.num_classes, in_chans=in_chans,
                                  img_size=config.img_size, mean=mean, std=std, model_args=config.model_args)
    preprocess = Preprocessor.from_model(model)
    inputs = torch.cat([preprocess(poisoned.images[i:i + 4096]) for i in range(0, len(poisoned), 4096)]).to(run_on)
    targets = torch.as_tensor(poisoned.labels).to(run_on)
    home = model_device(model)
    model.to(run_on)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * ((len(inputs) + config.batch_size - 1) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task(f"training {config.arch} on {config.dataset}", total=steps)
        for _ in range(config.epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for i in range(0, len(order), config.batch_size):
                idx = order[i:i + config.batch_size]
                loss = F.cross_entropy(model(inputs[idx]), targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.advance(task)
    model.eval()
    seconds = time.perf_counter() - start
    metrics = measure(model, test, preprocess, trigger=trigger, target=config.target)
    model.to(home)
    result = BackdoorResult(given if given is not None else model, config, list(train.label_names), metrics, seconds)
    if out_dir is not None:
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            save_model(model, tmp, label_names=train.label_names, model_args=getattr(model, "model_args", None),
                       metadata={"agme.backdoor": json.dumps({"trigger": trigger.spec, "target": config.target})})
            record = {"config": asdict(config), "trigger": trigger.spec, "metrics": metrics.as_dict(),
                      "train_seconds": round(seconds, 2)}
            (tmp / BACKDOOR_NAME).write_text(json.dumps(record, indent=2) + "\n")
        result.out_dir = Path(out_dir)
    return result


def cached_backdoored(config: BackdoorConfig, *, cache: str | Path | None = None, prefix: str = "",
                      key: Mapping[str, Any] | None = None, progress: bool = False) -> Path:
    """Train ``config`` once and keep it; returns the model folder, ``<cache>/<prefix><hash>``.

    ``cache`` defaults to agme's cache folder (``AGME_CACHE``). The hash is the first 12 hex digits of the
    sha256 of ``key`` as sorted JSON (default: every field of ``config``); callers that named their folders
    by another record before pass it here, so that the models they already trained are found again.
    A folder without its weights or its ``backdoor.json`` is trained (again).
    """
    record = asdict(config) if key is None else dict(key)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = Path(cache_dir() if cache is None else cache) / f"{prefix}{digest}"
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / BACKDOOR_NAME).is_file():
        train_backdoored(config, out_dir=folder, progress=progress, overwrite=True)
    return folder
