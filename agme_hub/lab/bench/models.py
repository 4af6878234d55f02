"""The backdoored models a grid defends: its triggers made concrete, and one model per (dataset, arch, trigger,
seed), trained once and cached."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...hub.checkpoint import load_model
from ...triggers import Trigger, parse_trigger
from ..backdoor import BACKDOOR_NAME, BackdoorConfig, cached_backdoored
from ..pretrained import cached_pretrained_backdoored
from .grid import TRIGGERS, BenchConfig, arch_spec

__all__ = ["resolve_trigger", "backdoored_model"]


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


def _model_prefix(dataset: str, arch: str, trigger_name: str, seed: int) -> str:
    safe = trigger_name.replace(":", "_").replace("/", "_").replace(",", "_").replace("=", "-")[:40]
    return f"{dataset}-{arch}-{safe}-s{seed}-"


def backdoored_model(cache: Path, dataset: str, arch: str, trigger_name: str, trigger_spec: str, seed: int,
                     config: BenchConfig, shape: tuple[int, int, int]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load from the cache) the backdoored model of one (dataset, arch, trigger, seed)."""
    spec = arch_spec(arch)
    bd = BackdoorConfig(dataset=dataset, arch=spec.timm_name, trigger=trigger_spec, target=config.target,
                        poison_rate=config.poison_rate, epochs=config.epochs or spec.epochs, seed=seed,
                        n_train=config.n_train, n_test=100, img_size=spec.img_size or config.img_size, lr=spec.lr,
                        model_args=dict(spec.model_args))
    if spec.pretrained:
        folder = cached_pretrained_backdoored(bd, cache=cache)
        info = json.loads((folder / BACKDOOR_NAME).read_text())
        return load_model(folder), {"model_dir": str(folder), "train_seconds": info.get("train_seconds")}
    # Keyed by what the trigger does rather than its spec, which names files that differ between runs.
    fingerprint = _trigger_fingerprint(parse_trigger(trigger_spec), shape)
    key = {**asdict(bd), "trigger": fingerprint, "bench_model_version": 1}
    folder = cached_backdoored(bd, cache=cache, prefix=_model_prefix(dataset, arch, trigger_name, seed), key=key)
    model = load_model(folder)
    info = json.loads((folder / BACKDOOR_NAME).read_text())
    return model, {"model_dir": str(folder), "train_seconds": info.get("train_seconds")}
