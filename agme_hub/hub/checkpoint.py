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

from ..constants import CONFIG_NAME, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME
from ..errors import (
    InvalidConfigError,
    InvalidWeightsError,
    OutputExistsError,
    PickleRefusedError,
    RepoNotFoundError,
    UnsupportedFormatError,
    WriteVerificationError,
)
from ..engine.classifier import is_transformers_model, unwrap
from .outputs import apply_umask, restore_interrupted_output

__all__ = [
    "read_config", "parse_config", "load_model", "save_model", "sha256_file", "atomic_output_dir", "describe_format",
    "validate_config", "build_model", "label_names", "model_config", "model_format", "MAX_INPUT_SIDE",
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
            config = json.loads(config_path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            return f"config.json that is not UTF-8 text (byte {err.start})"
        except (OSError, ValueError, RecursionError):
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
    if kind.startswith("config.json that is not UTF-8"):
        raise InvalidConfigError(f"{folder}/{CONFIG_NAME} is not UTF-8 text; save it as UTF-8 JSON")
    if kind != "timm":
        raise UnsupportedFormatError(
            f"{folder} is neither a timm nor a transformers image classifier: found {kind}. agme needs config.json "
            "with an 'architecture' field (timm) or with architectures [...ForImageClassification] (transformers), "
            "and model.safetensors."
        )
    config: dict[str, Any] = json.loads((folder / CONFIG_NAME).read_bytes().decode("utf-8"))
    validate_config(config, where=f"{folder}/{CONFIG_NAME}")
    return config


# Sides (pixels) above this are refused: a 100000x100000 input would ask the allocator for hundreds of GB.
MAX_INPUT_SIDE = 4096
MAX_CLASSES = 100_000
_RESERVED_MODEL_ARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                  "cache_dir", "model_name"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: dict[str, Any], *, where: str = CONFIG_NAME) -> None:
    """Check the fields agme and timm read, before any model is built; the message names the field.

    Raises:
        InvalidConfigError: a field of the wrong type or out of range, or an architecture timm does not know.
    """
    def bad(field: str, why: str) -> InvalidConfigError:
        return InvalidConfigError(f"{where}: field {field!r} {why}")

    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch.strip():
        raise bad("architecture", f"must be a timm model name, got {arch!r}")
    if ":" in arch or "/" in arch:  # "hf-hub:org/repo" would make timm download a config from the Hub
        raise bad("architecture", f"must be a timm model name, not a Hub reference ({arch!r})")
    import timm  # cheap once loaded; knowing the architecture now spares a download of unusable weights

    if not timm.is_model(arch.split(".")[0]):
        raise bad("architecture", f"names no timm model: {arch!r} (timm {timm.__version__}); check the name or "
                                  "upgrade timm")
    for field in ("pretrained_cfg", "model_args"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise bad(field, f"must be an object, got {type(config[field]).__name__}")
    num_classes = config.get("num_classes")
    if num_classes is not None and (not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES):
        raise bad("num_classes", f"must be an integer in 1..{MAX_CLASSES}, got {num_classes!r}")
    names = config.get("label_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise bad("label_names", "must be a list of strings")
        if num_classes is not None and len(names) != num_classes:
            raise bad("label_names", f"has {len(names)} names but num_classes is {num_classes}")
        if len({str(n) for n in names}) != len(names):
            raise bad("label_names", "has duplicate names")
    model_args = config.get("model_args") or {}
    for key in sorted(set(model_args) & _RESERVED_MODEL_ARGS):  # would load or fetch weights of timm's choosing
        raise bad(f"model_args.{key}", "is not allowed: agme loads the weights of the folder only")
    in_chans = model_args.get("in_chans")
    if in_chans is not None and (not _is_int(in_chans) or not 1 <= in_chans <= 16):
        raise bad("model_args.in_chans", f"must be an integer in 1..16, got {in_chans!r}")
    if model_args.get("num_classes") is not None and (
            not _is_int(model_args["num_classes"]) or not 0 <= model_args["num_classes"] <= MAX_CLASSES):
        raise bad("model_args.num_classes", f"must be an integer in 0..{MAX_CLASSES}, got {model_args['num_classes']!r}")
    pretrained_cfg = config.get("pretrained_cfg") or {}
    for key in ("input_size", "test_input_size"):
        size = pretrained_cfg.get(key)
        if size is None:
            continue
        if (not isinstance(size, list) or len(size) != 3 or not all(_is_int(v) for v in size)
                or not 1 <= size[0] <= 16 or not all(1 <= v <= MAX_INPUT_SIDE for v in size[1:])):
            raise bad(f"pretrained_cfg.{key}", f"must be [channels 1..16, height, width] with sides in "
                                               f"1..{MAX_INPUT_SIDE}, got {size!r}")
    for key in ("mean", "std"):
        values = pretrained_cfg.get(key)
        if values is not None and (not isinstance(values, list) or not values or
                                   not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise bad(f"pretrained_cfg.{key}", f"must be a list of numbers, got {values!r}")
    if pretrained_cfg.get("std") and any(v == 0 for v in pretrained_cfg["std"]):
        raise bad("pretrained_cfg.std", "must not hold 0")
    crop_pct = pretrained_cfg.get("crop_pct")
    if crop_pct is not None and (not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool)
                                 or not 0.05 <= crop_pct <= 1.0):
        raise bad("pretrained_cfg.crop_pct", f"must be a number in [0.05, 1], got {crop_pct!r}")
    for key in ("interpolation", "crop_mode", "first_conv", "classifier"):
        value = pretrained_cfg.get(key)
        if value is not None and not isinstance(value, (str, list)):
            raise bad(f"pretrained_cfg.{key}", f"must be a string, got {value!r}")


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


def label_names(config: dict[str, Any]) -> list[str]:
    """The class names a config gives (``label_names``), else the class indices as strings."""
    names = config.get("label_names")
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    return [str(i) for i in range(int(config.get("num_classes") or 0))]


def build_model(config: dict[str, Any], *, where: str = CONFIG_NAME) -> torch.nn.Module:
    """The timm model a (validated) config describes, with random weights, in eval mode.

    Raises:
        InvalidConfigError: timm does not know the architecture or cannot build it with these arguments.
    """
    import timm

    model_name, pretrained_cfg, model_args = parse_config(config)
    if not timm.is_model(model_name.split(".")[0]):
        raise InvalidConfigError(f"{where}: architecture {model_name!r} is not a timm model "
                                 f"(timm {timm.__version__}); check the name or upgrade timm")
    try:
        model = timm.create_model(model_name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    except Exception as err:  # timm and the model constructors raise many types for bad arguments
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InvalidConfigError(f"{where}: timm cannot build {model_name!r} with these model_args "
                                 f"({type(err).__name__}: {first})") from None
    return model.eval()


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

    A timm folder gives the timm model; a transformers folder gives a
    :class:`~agme_hub.engine.classifier.ClassifierView` of the transformers model (logits out, the processor
    config as its preprocessing).

    Raises:
        UnsupportedFormatError: not a timm folder, or weights that do not fit the architecture.
        PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
    """
    folder = Path(folder)
    if model_format(folder) == "transformers":
        # transformers_format builds on this module (its pickle policy): imported when used, not at the top
        from .transformers_format import load_transformers_model

        return load_transformers_model(folder, allow_pickle=allow_pickle)
    config = read_config(folder)  # format and field checks with a clear message
    weights_path, is_pickle = _weights_file(folder, allow_pickle)
    model = build_model(config, where=f"{folder}/{CONFIG_NAME}")
    state = _read_pickle_weights(weights_path) if is_pickle else _read_safetensors(weights_path)
    _check_state(state, model, name=weights_path.name, arch=str(config["architecture"]))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UnsupportedFormatError(f"{path.name} is corrupt or truncated: {first}") from None


def _read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``; a file it refuses becomes one line without PyTorch's advice to disable it."""
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OSError, MemoryError, OverflowError) as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        why = f"it asks for {found.group(1)}" if found else "it is not plain tensor data"
        raise PickleRefusedError(f"{path.name} was refused by the safe loader ({why}); agme never loads pickle "
                                 "unsafely: convert the weights to safetensors from a trusted copy") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UnsupportedFormatError(f"{path.name} does not hold a state dict (names -> tensors)")
    return state


def _check_state(state: dict[str, torch.Tensor], model: torch.nn.Module, *, name: str, arch: str) -> None:
    """Name the missing, extra, mis-shaped or non-finite tensor before load_state_dict (whose message stops short)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [k for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {list(state[k].shape)}, the architecture needs {list(expected[k].shape)}")
    if problems:
        raise InvalidWeightsError(f"weights in {name} do not fit {arch}: {'; '.join(problems)}")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise InvalidWeightsError(f"weights in {name}: tensor {key} holds {kind} values; the model is broken "
                                      "(re-export it from a good copy)")


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; move it into place only when the block completes.

    An interrupted or failed block leaves ``out_dir`` as it was. An existing ``out_dir`` is replaced only
    when ``overwrite`` is True (the caller decides whether its content may go). The new folder gets the modes
    the user's umask gives (mkdtemp makes it 0700).
    """

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_output(out_dir)  # a run killed between the two renames below hid the previous output
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            if not overwrite:
                raise OutputExistsError(f"{out_dir} exists; choose another folder or allow replacing it (--yes)")
            _swap_into_place(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``new``: two renames, with Ctrl-C held off between them and the old one put back
    if the second fails, so that ``out_dir`` is never missing while the previous output hides under another name."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    with _sigint_deferred():
        try:
            os.replace(out_dir, old)
            os.replace(new, out_dir)
        except BaseException:
            if (old.exists() or old.is_symlink()) and not out_dir.exists():
                os.replace(old, out_dir)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)  # --out was a file (or a link): rmtree would leave it behind


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block and raise it after (main thread only; elsewhere a no-op)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


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

    The written weights are read back and compared tensor by tensor before returning.
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
    for key, tensor in state.items():  # NaN never equals itself: the read-back check below would misreport it
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidWeightsError(f"the tensor {key} to be saved holds NaN or infinite values; nothing was "
                                      "written (a larger --lam keeps the edit stable)")
    meta = {"format": "pt", **(metadata or {})}
    save_file(state, folder / WEIGHTS_NAME, metadata=meta)
    _sort_safetensors_metadata(folder / WEIGHTS_NAME)
    reloaded = load_file(folder / WEIGHTS_NAME)
    for key, tensor in state.items():
        if not torch.equal(reloaded[key], tensor):
            raise WriteVerificationError(f"the written tensor {key} in {folder / WEIGHTS_NAME} does not match the "
                                         "model; check the disk and write again")
    return folder
