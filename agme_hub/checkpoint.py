"""Load and save timm-format folders: ``config.json`` + ``model.safetensors``.

Weights load from safetensors only. Pickle files (``.bin``/``.pth``) are read only when the caller
passes ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .classifier import is_transformers_model, unwrap
from .constants import CONFIG_NAME, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME
from .errors import PickleRefusedError, RepoNotFoundError, UnsupportedFormatError

__all__ = [
    "read_config", "parse_config", "load_model", "save_model", "sha256_file", "atomic_output_dir", "describe_format",
    "model_config", "model_format",
]

_logger = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_format(folder: Path) -> str:
    """Name what a folder holds, for error messages: 'timm', 'transformers', 'unknown (...)'."""
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError):
            return "unreadable config.json"
        if isinstance(config, dict) and "architecture" in config:
            return "timm"
        if isinstance(config, dict) and ("architectures" in config or "model_type" in config):
            return f"transformers (model_type={config.get('model_type', '?')})"
        return "config.json without an 'architecture' field"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return f"no config.json (files: {', '.join(names[:8]) or 'none'})"


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a timm ``config.json``; refuse anything else with a message that says what was found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RepoNotFoundError(f"Model folder not found: {folder}")
    kind = describe_format(folder)
    if kind != "timm":
        raise UnsupportedFormatError(
            f"{folder} is neither a timm nor a transformers image classifier: found {kind}. agme needs config.json "
            "with an 'architecture' field (timm) or with architectures [...ForImageClassification] (transformers), "
            "and model.safetensors."
        )
    return json.loads((folder / CONFIG_NAME).read_text())


def model_format(folder: str | os.PathLike[str]) -> str:
    """``"transformers"`` for a transformers folder, else ``"timm"`` (checked when read)."""
    return "transformers" if describe_format(Path(folder)).startswith("transformers") else "timm"


def model_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``read_config`` for timm folders; for transformers folders a summary of the same shape.

    The summary has ``architecture``, ``num_classes``, ``label_names`` and ``format: transformers``.
    """
    if model_format(folder) == "transformers":
        # transformers_format builds on this module (its pickle policy): imported when used, not at the top
        from .transformers_format import summary_config

        return summary_config(folder)
    return read_config(folder)


def parse_config(config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, pretrained_cfg, create_model kwargs) of a timm config.json, as timm reads it."""
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    model_args = dict(config.get("model_args") or {})
    if "num_classes" in config:
        pretrained_cfg["num_classes"] = config["num_classes"]
        model_args.setdefault("num_classes", config["num_classes"])
    for key in ("label_names", "label_descriptions"):
        if key in config:
            pretrained_cfg[key] = config[key]
    input_size = pretrained_cfg.get("input_size")
    if model_args.get("in_chans") is not None and input_size:
        pretrained_cfg["input_size"] = (model_args["in_chans"], *input_size[1:])
    elif input_size and input_size[0] != 3:
        model_args["in_chans"] = input_size[0]
    pretrained_cfg["architecture"] = config["architecture"]
    return config["architecture"], pretrained_cfg, model_args


def _weights_file(folder: Path, allow_pickle: bool) -> tuple[Path, bool]:
    if (folder / WEIGHTS_NAME).is_file():
        return folder / WEIGHTS_NAME, False
    pickles = [folder / name for name in PICKLE_WEIGHTS_NAMES if (folder / name).is_file()]
    if pickles and not allow_pickle:
        raise PickleRefusedError(
            f"{folder} holds only pickle weights ({pickles[0].name}); loading pickle can run code. "
            "Convert to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)."
        )
    if pickles:
        return pickles[0], True
    raise UnsupportedFormatError(f"{folder} has config.json but no {WEIGHTS_NAME}")


def load_model(folder: str | os.PathLike[str], *, allow_pickle: bool = False) -> torch.nn.Module:
    """Build the model a folder describes and load its weights, in eval mode.

    A timm folder gives the timm model; a transformers folder gives a :class:`~agme_hub.classifier.ClassifierView`
    of the transformers model (logits out, the processor config as its preprocessing).

    Raises:
        UnsupportedFormatError: not a timm folder, or weights that do not fit the architecture.
        PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
    """
    import timm

    folder = Path(folder)
    if model_format(folder) == "transformers":
        # transformers_format builds on this module (its pickle policy): imported when used, not at the top
        from .transformers_format import load_transformers_model

        return load_transformers_model(folder, allow_pickle=allow_pickle)
    config = read_config(folder)  # format check with a clear message
    weights_path, is_pickle = _weights_file(folder, allow_pickle)
    model_name, pretrained_cfg, model_args = parse_config(config)
    try:
        model = timm.create_model(model_name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise UnsupportedFormatError(f"timm cannot build architecture {model_name!r}: {err}") from None
    if is_pickle:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    else:
        try:
            state = load_file(weights_path)
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
            raise UnsupportedFormatError(f"{weights_path.name} is corrupt or truncated: {str(err).splitlines()[0]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UnsupportedFormatError(f"weights in {weights_path.name} do not fit {model_name}: {first}") from None
    return model.eval()


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; move it into place only when the block completes.

    An interrupted or failed block leaves ``out_dir`` as it was. An existing ``out_dir`` is replaced only
    when ``overwrite`` is True (the caller decides whether its content may go).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(out_dir)
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the safetensors header with its ``__metadata__`` keys sorted, in place (same length).

    safetensors writes the metadata in hash-map order, which changes from process to process: without this,
    two identical runs would give different bytes, a different sha256 and a needless new commit on re-push.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        if not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for what safetensors writes; keep the file as it is then
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces too


def save_model(
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    *,
    label_names: list[str] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` (with ``__metadata__``) and a timm ``config.json`` into ``folder``.

    The written weights are read back and compared tensor by tensor before returning. A transformers model
    (or a view of one) is written in the transformers format instead (``pretrained_cfg``/``model_args`` unused).
    """
    if is_transformers_model(unwrap(model)):
        # transformers_format builds on this module (its pickle policy): imported when used, not at the top
        from .transformers_format import save_transformers_model

        return save_transformers_model(model, folder, label_names=label_names, metadata=metadata)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(pretrained_cfg or {})
    cfg["num_classes"] = model.num_classes
    config: dict[str, Any] = {
        "architecture": cfg.get("architecture") or model.default_cfg.get("architecture"),
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "global_pool": getattr(model, "global_pool", None) if isinstance(getattr(model, "global_pool", None), str) else None,
    }
    config = {k: v for k, v in config.items() if v is not None}
    if label_names is not None:
        config["label_names"] = list(label_names)
    args = dict(model_args or {})
    args.setdefault("num_classes", model.num_classes)
    config["model_args"] = args
    config["pretrained_cfg"] = {k: v for k, v in cfg.items() if k not in {"architecture", "hf_hub_id", "url", "file"}}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", **(metadata or {})}
    save_file(state, folder / WEIGHTS_NAME, metadata=meta)
    _sort_safetensors_metadata(folder / WEIGHTS_NAME)
    reloaded = load_file(folder / WEIGHTS_NAME)
    for key, tensor in state.items():
        if not torch.equal(reloaded[key], tensor):
            raise RuntimeError(f"the written tensor {key} does not match the model")
    return folder
