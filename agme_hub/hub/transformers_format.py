"""Read and write transformers image classifiers: ``config.json`` + ``preprocessor_config.json`` + ``model.safetensors``.

A transformers image-classification folder (most image classifiers on the Hub) has a ``config.json`` whose
``architectures`` names a ``...ForImageClassification`` class, the image processor's ``preprocessor_config.json``
and the weights. agme loads it with ``AutoModelForImageClassification`` (safetensors only unless pickle is
allowed, then ``weights_only=True``; never ``trust_remote_code``), turns the processor config into agme's
:class:`~agme_hub.data.Preprocessor`, and hands the engine a :class:`~agme_hub.classifier.ClassifierView` whose
layer names are the model's own (``classifier``, ``vit.layers.3.mlp.fc1``). ``save_transformers_model`` writes
the same format back with ``save_pretrained``, so ``AutoModelForImageClassification.from_pretrained(out)`` and
``pipeline("image-classification", model=out)`` load the result.

transformers is an optional extra: ``pip install "agme[transformers]"``. Detecting the format needs only JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .checkpoint import _sort_safetensors_metadata, _weights_file
from ..engine.classifier import ClassifierView, unwrap
from ..constants import CONFIG_NAME, WEIGHTS_NAME
from ..data import Preprocessor
from ..errors import MissingExtraError, UnsupportedFormatError, UsageError

__all__ = [
    "PROCESSOR_CONFIG_NAME", "TRANSFORMERS_EXTRA", "TINY_CONFIGS", "require_transformers", "is_transformers_folder",
    "check_transformers_folder", "summary_config", "preprocessor_from_processor_config", "processor_config_for",
    "load_transformers_model", "build_transformers_model", "save_transformers_model", "create_transformers_classifier",
]

PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
TRANSFORMERS_EXTRA = 'pip install "agme[transformers]"'
_IMAGE_CLASSIFIER_SUFFIX = "ForImageClassification"
# PIL's resampling filters as image processors store them (PIL.Image.Resampling values).
_RESAMPLE_NAMES = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_RESAMPLE_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}

# Tiny configurations of three families, small enough to train on 32-px Fashion-MNIST in seconds to minutes.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # 8-px patches: with 4-px ones (64 tokens) the backdoor did not take in 6 epochs on 3000 images (ASR 8%).
    "vit": ("ViTForImageClassification", dict(patch_size=8, hidden_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, intermediate_size=128)),
    "convnext": ("ConvNextForImageClassification", dict(patch_size=2, hidden_sizes=[16, 32, 64, 128],
                                                        depths=[1, 1, 2, 1])),
    "resnet": ("ResNetForImageClassification", dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                                    depths=[1, 1, 1, 1], layer_type="basic")),
}


def require_transformers() -> ModuleType:
    """Import transformers, or say in one line which extra to install."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(f"this is a transformers model and transformers is not installed: {TRANSFORMERS_EXTRA}"
                                ) from None
    return transformers


@contextmanager
def _quiet_transformers() -> Iterator[ModuleType]:
    """transformers with its progress bars and load/save warnings off (agme reports its own stages)."""
    transformers = require_transformers()
    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    level = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# DETECTION
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or not UTF-8 (checked elsewhere)
        return None
    return value if isinstance(value, dict) else None


def is_transformers_folder(folder: str | os.PathLike[str]) -> bool:
    """True when ``config.json`` is a transformers config (``architectures`` or ``model_type``, no timm ``architecture``)."""
    config = _read_json(Path(folder) / CONFIG_NAME)
    return config is not None and "architecture" not in config and ("architectures" in config or "model_type" in config)


def _image_architecture(config: dict[str, Any]) -> str | None:
    names = config.get("architectures") or []
    return next((str(n) for n in names if str(n).endswith(_IMAGE_CLASSIFIER_SUFFIX)), None)


def check_transformers_folder(folder: str | os.PathLike[str], *, where: str | None = None,
                              files: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The config of a transformers image classifier; refuse other transformers models naming what was found.

    ``files`` is the repo's file listing (a Hub dry run has only the config files locally).
    """
    folder = Path(folder)
    where = where or str(folder)
    config = _read_json(folder / CONFIG_NAME) or {}
    architecture = _image_architecture(config)
    if architecture is None:
        found = ", ".join(map(str, config.get("architectures") or [])) or "no architectures"
        raise UnsupportedFormatError(f"{where} holds transformers (model_type={config.get('model_type', '?')}) "
                                     f"{found}, not an image classifier: agme needs a timm checkpoint or a transformers "
                                     f"one with architectures [...{_IMAGE_CLASSIFIER_SUFFIX}]")
    listing = files if files is not None else tuple(p.name for p in folder.iterdir())
    if PROCESSOR_CONFIG_NAME not in listing:
        raise UnsupportedFormatError(f"{where} has no {PROCESSOR_CONFIG_NAME}: agme needs the image processor's "
                                     "config to preprocess images the way the model expects")
    return config


def _label_names(config: dict[str, Any]) -> list[str]:
    id2label = config.get("id2label") or {}
    count = int(config.get("num_labels") or len(id2label) or 0)
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]


def summary_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What the pipeline reads of a config, shaped like a timm config: architecture, num_classes, label_names."""
    config = check_transformers_folder(folder)
    names = _label_names(config)
    return {"architecture": _image_architecture(config), "num_classes": len(names), "label_names": names,
            "format": "transformers", "model_type": config.get("model_type")}


# PREPROCESSING: image processor config <-> agme Preprocessor
def preprocessor_from_processor_config(processor: dict[str, Any], *, num_channels: int = 3) -> Preprocessor:
    """agme's Preprocessor for what an image processor does: resize, center crop, rescale to [0, 1], normalize.

    Supported: ``size`` as ``{height, width}`` (ViT, DeiT, BEiT, Swin), as ``{shortest_edge}`` with ``crop_pct``
    (ConvNeXt, ResNet) or with ``crop_size`` (CLIP-style), or a plain int. Resizing uses torch's interpolation,
    not PIL's, so pixels may differ slightly from the image processor's.
    """
    kind = str(processor.get("image_processor_type") or processor.get("feature_extractor_type") or "")
    size = processor.get("size", 224)
    if isinstance(size, int):
        size = {"shortest_edge": size} if kind.startswith("ConvNext") else {"height": size, "width": size}
    interpolation = _RESAMPLE_NAMES.get(int(processor.get("resample", 2)), "bilinear")
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "height" in size:
        h, w = int(size["height"]), int(size["width"])
        if crop:  # resize to (h, w), then center crop
            out, crop_pct, mode = (int(crop["height"]), int(crop["width"])), int(crop["height"]) / h, "squash"
        else:
            out, crop_pct, mode = (h, w), 1.0, "squash"
    elif "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if "crop_pct" in processor and edge < 384:  # ConvNeXt: resize to edge / crop_pct, center crop edge
            out, crop_pct, mode = (edge, edge), float(processor["crop_pct"] or 1.0), "center"
        elif "crop_pct" in processor:  # ConvNeXt at >= 384: warp to (edge, edge), no crop
            out, crop_pct, mode = (edge, edge), 1.0, "squash"
        elif crop:  # resize the shorter edge, center crop crop_size
            out, crop_pct, mode = (int(crop["height"]), int(crop["width"])), int(crop["height"]) / edge, "center"
        else:
            out, crop_pct, mode = (edge, edge), 1.0, "center"
    else:
        raise UnsupportedFormatError(f"image processor size {size} is not supported (use height/width or shortest_edge)")
    if processor.get("do_normalize", True):
        mean = tuple(float(m) for m in processor.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(s) for s in processor.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0,) * num_channels, (1.0,) * num_channels
    if len(mean) != num_channels:
        mean, std = (sum(mean) / len(mean),) * num_channels, (sum(std) / len(std),) * num_channels
    return Preprocessor((num_channels, *out), mean, std, interpolation, crop_pct, mode)


def processor_config_for(preprocessor: Preprocessor) -> dict[str, Any]:
    """A ``ViTImageProcessor`` config that does what ``preprocessor`` does (a resize to the input size, no crop)."""
    if preprocessor.crop_pct != 1.0:
        raise UsageError("only a preprocessing without cropping (crop_pct 1.0) can be written as a ViTImageProcessor")
    _, height, width = preprocessor.input_size
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": height, "width": width},
            "resample": _RESAMPLE_CODES.get(preprocessor.interpolation, 2), "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(preprocessor.mean),
            "image_std": list(preprocessor.std)}


# LOAD AND SAVE
def _weights(folder: Path, allow_pickle: bool) -> bool:
    """True when the weights are safetensors; False for a pickle that ``allow_pickle`` lets through."""
    _, is_pickle = _weights_file(folder, allow_pickle)  # the one place the pickle policy is written down
    return not is_pickle


def _view(model: torch.nn.Module, folder: Path, config: dict[str, Any]) -> ClassifierView:
    processor = _read_json(folder / PROCESSOR_CONFIG_NAME) or {}
    preprocessor = preprocessor_from_processor_config(processor, num_channels=int(config.get("num_channels", 3)))
    return ClassifierView(model.eval(), preprocessor=preprocessor, source_format="transformers",
                          processor_config=processor)


def load_transformers_model(folder: str | os.PathLike[str], *, allow_pickle: bool = False) -> ClassifierView:
    """Load a transformers image classifier folder as a view the engine can use (eval mode).

    Raises:
        MissingExtraError: transformers is not installed.
        UnsupportedFormatError: not an image classifier, no processor config, or weights that do not fit.
        PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
    """
    folder = Path(folder)
    config = check_transformers_folder(folder)
    safetensors = _weights(folder, allow_pickle)
    with _quiet_transformers() as transformers:
        try:
            model, info = transformers.AutoModelForImageClassification.from_pretrained(
                folder, local_files_only=True, use_safetensors=safetensors, weights_only=True,
                trust_remote_code=False, output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnsupportedFormatError(f"transformers cannot load {folder}: {first}") from None
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "mismatched_keys")}
    if any(problems.values()):
        which = next(k for k, v in problems.items() if v)
        raise UnsupportedFormatError(f"weights in {folder} do not fit {_image_architecture(config)}: "
                                     f"{which.replace('_', ' ')} {', '.join(map(str, problems[which][:3]))}")
    return _view(model, folder, config)


def build_transformers_model(folder: str | os.PathLike[str]) -> ClassifierView:
    """The architecture a folder describes with untrained weights (for ``inspect`` and dry runs: no weights read)."""
    folder = Path(folder)
    config = check_transformers_folder(folder)
    with _quiet_transformers() as transformers:
        hf_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = transformers.AutoModelForImageClassification.from_config(hf_config)
    return _view(model, folder, config)


def save_transformers_model(model: torch.nn.Module, folder: str | os.PathLike[str], *,
                            label_names: list[str] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write a transformers folder: ``save_pretrained`` (safetensors), the processor config, agme's metadata.

    ``model`` is a :class:`ClassifierView` (its processor config is written back as it was loaded) or a
    transformers model. The written weights are read back and compared tensor by tensor before returning.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_model = unwrap(model)
    if label_names is not None:
        hf_model.config.id2label = {i: str(n) for i, n in enumerate(label_names)}
        hf_model.config.label2id = {str(n): i for i, n in enumerate(label_names)}
    with _quiet_transformers():
        hf_model.save_pretrained(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise UnsupportedFormatError(f"save_pretrained wrote no single {WEIGHTS_NAME} (sharded models are not supported)")
    with safe_open(str(weights), "pt") as handle:
        written_meta = dict(handle.metadata() or {})
    state = load_file(weights)
    save_file(state, weights, metadata={**written_meta, "format": "pt", **(metadata or {})})
    _sort_safetensors_metadata(weights)
    if isinstance(model, ClassifierView):
        processor = model.processor_config or processor_config_for(model.preprocessor)
        (folder / PROCESSOR_CONFIG_NAME).write_text(json.dumps(processor, indent=2) + "\n")
    own = hf_model.state_dict()
    for key, tensor in load_file(weights).items():
        if key in own and not torch.equal(own[key].detach().cpu(), tensor):
            raise RuntimeError(f"the written tensor {key} does not match the model")
    return folder


# TRAINING FROM A CONFIG (tests, benchmarks)
def create_transformers_classifier(family: str, *, num_classes: int, img_size: int,
                                   mean: tuple[float, ...], std: tuple[float, ...], label_names: list[str] | None = None,
                                   model_args: dict[str, Any] | None = None) -> ClassifierView:
    """An untrained transformers classifier from a tiny config (``vit``, ``convnext``, ``resnet``) or a class name.

    The model takes 3-channel input (grey images are repeated) so that ``pipeline("image-classification")``,
    which converts every image to RGB, can run it; the view resizes to ``img_size`` without cropping.
    """
    transformers = require_transformers()
    class_name, defaults = TINY_CONFIGS.get(family, (family, {}))
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not class_name.endswith(_IMAGE_CLASSIFIER_SUFFIX):
        raise UsageError(f"unknown transformers family {family!r}: use {', '.join(TINY_CONFIGS)} or a "
                         f"...{_IMAGE_CLASSIFIER_SUFFIX} class name")
    names = label_names or [str(i) for i in range(num_classes)]
    args = {**defaults, **(model_args or {}), "num_channels": 3, "num_labels": num_classes,
            "id2label": {i: n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    if "image_size" in model_class.config_class().to_dict():
        args.setdefault("image_size", img_size)
    model = model_class(model_class.config_class(**args))
    if len(mean) != 3:
        mean, std = (sum(mean) / len(mean),) * 3, (sum(std) / len(std),) * 3
    preprocessor = Preprocessor((3, img_size, img_size), tuple(mean), tuple(std), "bilinear", 1.0, "squash")
    return ClassifierView(model, preprocessor=preprocessor, source_format="transformers",
                          processor_config=processor_config_for(preprocessor))
