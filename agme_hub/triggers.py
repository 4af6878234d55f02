"""Backdoor triggers: one spec string (or a JSON/YAML file with the same fields) -> a trigger object.

A trigger stamps raw uint8 images ``(N, H, W, C)``, before any preprocessing, and is deterministic
for a given seed::

    trigger = parse_trigger("patch:size=3,pos=bottom-right,fill=white")
    stamped = trigger.apply(images)

Kinds: ``patch`` (BadNets), ``blend``, ``image`` (pattern + grey-level mask, the general form),
``additive`` (bounded full-image perturbation, the form of Narcissus-style triggers), ``sig`` (a
sinusoidal signal over the whole image, Barni et al. 2019) and ``lsb`` (an invisible least-significant-bit
code). ``PRESETS`` holds the six BadNets variants.

Two forms are not stamps described by fields (:mod:`agme_hub.trigger_forms`): ``python:pkg.module:function``
(or a Python function) is the user's own transform, e.g. a warp, and a ``PairedTrigger`` holds triggered
twins given as images (``--triggered-data``). The triggers agme reconstructs itself, held as arrays, are in
:mod:`agme_hub.surrogate_triggers`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import ShapeMismatchError, TriggerSpecError

__all__ = [
    "Trigger", "PatchTrigger", "BlendTrigger", "ImageTrigger", "AdditiveTrigger", "SIGTrigger", "LSBTrigger",
    "parse_trigger", "PRESETS", "TRIGGER_KINDS", "CALLABLE_PREFIX",
]

_HEX_COLOUR = re.compile(r"^#[0-9a-f]{6}$")
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "red": (255, 0, 0), "green": (0, 255, 0),
            "blue": (0, 0, 255), "yellow": (255, 255, 0), "grey": (128, 128, 128)}

# The six BadNets variants of the AGME paper's Figure 2: patch shapes, colours and places.
PRESETS: dict[str, str] = {
    "badnets-white-br": "patch:size=3,pos=bottom-right,fill=white",
    "badnets-checker-br": "patch:size=3,pos=bottom-right,fill=checker",
    "badnets-black-tl": "patch:size=3,pos=top-left,fill=black",
    "badnets-noise-center": "patch:size=4,pos=center,fill=noise,seed=0",
    "badnets-bar-bl": "patch:size=1x5,pos=bottom-left,fill=white",
    "badnets-red-tr": "patch:size=3,pos=top-right,fill=red",
}


def _load_picture(path: str, shape: tuple[int, int, int], resize: bool, what: str, grey: bool = False) -> np.ndarray:
    """Read a PNG/JPG/.npy as float ``(H, W, C)`` in [0, 255] (or [0, 1] grey for masks), sized to ``shape``."""
    from PIL import Image

    h, w, c = shape
    file = Path(path)
    if not file.is_file():
        raise TriggerSpecError(f"{what} file not found: {path}")
    if file.suffix == ".npy":
        arr = _load_npy(file, what)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[:2] != (h, w):
            if not resize:
                raise ShapeMismatchError(f"{what} {path} is {arr.shape[1]}x{arr.shape[0]}, images are {w}x{h}; "
                                         "resize it or add resize=true")
            import torch
            t = torch.as_tensor(arr).permute(2, 0, 1)[None]
            arr = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0]
            arr = arr.permute(1, 2, 0).numpy()
    else:
        try:
            img = Image.open(file)
            img.load()
        except OSError as err:
            raise TriggerSpecError(f"cannot read {what} {path}: {err}") from None
        if img.size != (w, h):
            if not resize:
                raise ShapeMismatchError(f"{what} {path} is {img.size[0]}x{img.size[1]}, images are {w}x{h}; "
                                         "resize it or add resize=true")
            img = img.resize((w, h), Image.BILINEAR)
        arr = np.asarray(img.convert("L" if (grey or c == 1) else "RGB"), np.float32)
        if arr.ndim == 2:
            arr = arr[..., None]
        if grey:
            arr = arr / 255.0
    if arr.shape[-1] != c and not grey:
        arr = arr.mean(-1, keepdims=True) if c == 1 else np.repeat(arr[..., :1], c, axis=-1)
    return arr


def _load_npy(file: Path, what: str) -> np.ndarray:
    """A numeric .npy of 2 or 3 dimensions with finite values; pickled or other arrays are refused by name."""
    try:
        with open(file, "rb") as fh:
            magic = fh.read(6)
    except OSError as err:
        raise TriggerSpecError(f"cannot read {what} {file}: {err.strerror or type(err).__name__}") from None
    if magic != b"\x93NUMPY":
        raise TriggerSpecError(f"cannot read {what} {file}: not a NumPy .npy file")
    try:
        arr = np.load(file, allow_pickle=False)
    except ValueError as err:
        why = "it holds pickled objects, which agme never loads" if "pickle" in str(err) else "it is not a NumPy array"
        raise TriggerSpecError(f"cannot read {what} {file}: {why}") from None
    except (OSError, EOFError) as err:
        raise TriggerSpecError(f"cannot read {what} {file}: {type(err).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise TriggerSpecError(f"{what} {file} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and 1 not in (arr.shape[0], arr.shape[-1])
                                  and 3 not in (arr.shape[0], arr.shape[-1])):
        raise TriggerSpecError(f"{what} {file} must be an image array (H,W), (H,W,C) or (C,H,W), got shape "
                               f"{tuple(arr.shape)}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise TriggerSpecError(f"{what} {file} holds NaN or infinite values")
    return arr


@dataclass(frozen=True)
class Trigger:
    """Base class: ``apply`` stamps a uint8 batch; ``spec`` is the canonical spec string."""

    kind: ClassVar[str] = ""
    # False for a trigger known only on given images (PairedTrigger): the engine cannot stamp an augmented
    # copy, so it augments each clean image and its twin together (engine.edit.augmented_pairs).
    applies_to_any_image: ClassVar[bool] = True

    @property
    def spec(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == "":
                continue
            if isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, tuple):
                value = ",".join(map(str, value))
            parts.append(f"{f.name}={value}")
        return f"{self.kind}:{','.join(parts)}" if parts else self.kind

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Stamp the trigger on uint8 images ``(N, H, W, C)`` (or one ``(H, W, C)`` image)."""
        single = images.ndim == 3
        batch = images[None] if single else images
        if batch.ndim != 4 or batch.dtype != np.uint8:
            raise ShapeMismatchError(f"triggers stamp uint8 (N,H,W,C) images, got {batch.dtype} {batch.shape}")
        out = np.clip(np.rint(self._stamp(batch.astype(np.float32), batch.shape[1:])), 0, 255).astype(np.uint8)
        return out[0] if single else out

    def stamp_pil(self, image: Any) -> Any:
        """Stamp one PIL image; returns a new PIL image of the same mode."""
        from PIL import Image

        arr = np.asarray(image)
        stamped = self.apply(arr[..., None] if arr.ndim == 2 else arr)
        return Image.fromarray(stamped[..., 0] if arr.ndim == 2 else stamped, mode=image.mode)

    def pattern_and_mask(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The (pattern in [0,255], mask in [0,1]) form of the trigger, where it has one."""
        return None

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        pattern, mask = self.pattern_and_mask(shape)  # type: ignore[misc]
        return (1.0 - mask) * x + mask * pattern


def _parse_size(value: str) -> tuple[int, int]:
    try:
        if "x" in str(value):
            w, h = str(value).lower().split("x")
            return int(h), int(w)
        return int(value), int(value)
    except ValueError:
        raise TriggerSpecError(f"patch size {value!r} must be N or WxH, e.g. 3 or 1x5") from None


@dataclass(frozen=True)
class PatchTrigger(Trigger):
    """BadNets: a small patch at a corner, the centre or ``x,y``. ``size`` is ``N`` or ``WxH``."""

    kind: ClassVar[str] = "patch"
    size: str = "3"
    pos: str = "bottom-right"
    fill: str = "white"
    seed: int = 0
    margin: int = 0

    def _box(self, shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        H, W, _ = shape
        ph, pw = _parse_size(self.size)
        m = self.margin
        if ph > H or pw > W or ph < 1 or pw < 1:
            raise ShapeMismatchError(f"patch {pw}x{ph} does not fit images of {W}x{H}")
        if self.pos in _CORNERS:
            top = {"top": m, "bottom": H - ph - m, "center": (H - ph) // 2}[self.pos.split("-")[0]]
            left = {"left": m, "right": W - pw - m, "center": (W - pw) // 2}[self.pos.split("-")[-1]]
            if not (0 <= left <= W - pw and 0 <= top <= H - ph):
                raise ShapeMismatchError(f"patch {pw}x{ph} at {self.pos} with margin {m} does not fit images of "
                                         f"{W}x{H}")
        else:
            try:
                left, top = (int(v) for v in self.pos.split(","))
            except ValueError:
                raise TriggerSpecError(f"pos {self.pos!r}: use one of {', '.join(_CORNERS)} or x,y") from None
            if not (0 <= left <= W - pw and 0 <= top <= H - ph):
                raise ShapeMismatchError(f"patch at {left},{top} of size {pw}x{ph} leaves images of {W}x{H}")
        return top, left, ph, pw

    def pattern_and_mask(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        H, W, C = shape
        top, left, ph, pw = self._box(shape)
        fill = self.fill.lower()
        if fill in _COLOURS:
            rgb = np.array(_COLOURS[fill], np.float32)
            colour = rgb if C == 3 else np.array([rgb @ np.array([0.299, 0.587, 0.114])], np.float32)
            patch = np.broadcast_to(colour, (ph, pw, C))
        elif fill == "checker":
            grid = (np.indices((ph, pw)).sum(0) % 2 == 0).astype(np.float32) * 255
            patch = np.repeat(grid[..., None], C, axis=2)
        elif fill == "noise":
            patch = np.random.default_rng(self.seed).integers(0, 256, (ph, pw, C)).astype(np.float32)
        elif _HEX_COLOUR.fullmatch(fill):
            rgb = np.array([int(fill[i:i + 2], 16) for i in (1, 3, 5)], np.float32)
            patch = np.broadcast_to(rgb if C == 3 else rgb.mean(keepdims=True), (ph, pw, C))
        elif Path(self.fill).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".npy"):
            patch = _load_picture(self.fill, (ph, pw, C), resize=False, what="patch fill")
        else:
            raise TriggerSpecError(f"fill {self.fill!r}: use white, black, red, green, blue, yellow, grey, checker, "
                                   "noise, #rrggbb or a PNG path")
        pattern = np.zeros(shape, np.float32)
        mask = np.zeros((H, W, 1), np.float32)
        pattern[top:top + ph, left:left + pw] = patch
        mask[top:top + ph, left:left + pw] = 1.0
        return pattern, mask


@dataclass(frozen=True)
class BlendTrigger(Trigger):
    """Blended attack: ``x' = (1 - alpha) x + alpha p`` with ``p`` seeded noise or an image."""

    kind: ClassVar[str] = "blend"
    alpha: float = 0.15
    image: str = "noise"
    seed: int = 0
    resize: bool = False

    def pattern_and_mask(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if not 0.0 < self.alpha <= 1.0:
            raise TriggerSpecError(f"blend alpha must be in (0, 1], got {self.alpha}")
        if self.image == "noise":
            pattern = np.random.default_rng(self.seed).integers(0, 256, shape).astype(np.float32)
        else:
            pattern = _load_picture(self.image, shape, self.resize, "blend image")
        return pattern, np.full(shape[:2] + (1,), self.alpha, np.float32)


@dataclass(frozen=True)
class ImageTrigger(Trigger):
    """The general form: ``x' = (1 - m) x + m p`` with a pattern image and a grey-level mask in [0, 1]."""

    kind: ClassVar[str] = "image"
    pattern: str = ""
    mask: str = ""
    resize: bool = False

    def pattern_and_mask(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if not self.pattern or not self.mask:
            raise TriggerSpecError("an image trigger needs pattern=PATH and mask=PATH")
        pattern = _load_picture(self.pattern, shape, self.resize, "pattern")
        mask = _load_picture(self.mask, shape[:2] + (1,), self.resize, "mask", grey=True)
        return pattern, np.clip(mask[..., :1], 0.0, 1.0)


@dataclass(frozen=True)
class AdditiveTrigger(Trigger):
    """A full-image perturbation bounded by ``eps`` (of 1): ``x' = clip(x + delta)``, ``|delta| <= eps``.

    ``delta`` is a ``.npy`` (values in pixel units of [0, 1], clipped to eps), a ``.png`` (mid-grey = 0,
    scaled to +-eps), or ``noise`` (seeded +-eps signs).
    """

    kind: ClassVar[str] = "additive"
    delta: str = "noise"
    eps: str = "16/255"
    seed: int = 0
    resize: bool = False

    def _eps(self) -> float:
        try:
            value = float(Fraction(self.eps))
        except (ValueError, ZeroDivisionError):
            raise TriggerSpecError(f"eps {self.eps!r} must be a number or a fraction such as 16/255") from None
        if not 0 < value <= 1:
            raise TriggerSpecError(f"eps must be in (0, 1], got {value}")
        return value

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        eps = self._eps()
        if self.delta == "noise":
            delta = np.random.default_rng(self.seed).choice([-eps, eps], size=shape).astype(np.float32)
        elif self.delta.endswith(".npy"):
            delta = np.clip(_load_picture(self.delta, shape, self.resize, "delta"), -eps, eps)
        else:
            delta = (_load_picture(self.delta, shape, self.resize, "delta") / 127.5 - 1.0) * eps
        return x + 255.0 * delta


@dataclass(frozen=True)
class SIGTrigger(Trigger):
    """SIG (Barni et al. 2019): ``x' = clip(x + v)``, ``v = delta sin(2 pi j freq / W)`` along the columns ``j``.

    ``delta`` is the amplitude in pixel units (of 255), the same on every row and channel; ``freq`` the number
    of periods across the image's width.
    """

    kind: ClassVar[str] = "sig"
    delta: float = 20.0
    freq: float = 6.0

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        _check_sig(self)
        width = shape[1]
        signal = self.delta * np.sin(2.0 * np.pi * np.arange(width, dtype=np.float64) * self.freq / width)
        return x + signal.astype(np.float32)[None, None, :, None]


def _check_sig(trigger: "SIGTrigger") -> None:
    if not 0.0 < trigger.delta <= 255.0:
        raise TriggerSpecError(f"sig delta (amplitude in pixel units) must be in (0, 255], got {trigger.delta}")
    if not 0.0 < trigger.freq <= 1024.0:
        raise TriggerSpecError(f"sig freq (periods across the width) must be in (0, 1024], got {trigger.freq}")


@dataclass(frozen=True)
class LSBTrigger(Trigger):
    """Steganography-style: the ``bits`` least significant bits of every pixel replaced by a seeded code."""

    kind: ClassVar[str] = "lsb"
    seed: int = 0
    bits: int = 2

    def _stamp(self, x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        if not 1 <= self.bits <= 4:
            raise TriggerSpecError(f"lsb bits must be 1..4, got {self.bits}")
        code = np.random.default_rng(self.seed).integers(0, 2 ** self.bits, shape).astype(np.uint8)
        high = x.astype(np.uint8) & np.uint8(0xFF ^ (2 ** self.bits - 1))
        return (high | code).astype(np.float32)


CALLABLE_PREFIX = "python:"  # the one spec that imports code (trigger_forms.CallableTrigger): named explicitly
CALLABLE_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

TRIGGER_KINDS: dict[str, type[Trigger]] = {
    cls.kind: cls for cls in (PatchTrigger, BlendTrigger, ImageTrigger, AdditiveTrigger, SIGTrigger, LSBTrigger)
}


def _split_fields(body: str) -> dict[str, str]:
    """``size=3,pos=2,5,fill=white`` -> fields; a part without ``=`` continues the previous value."""
    out: dict[str, str] = {}
    last = None
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" in part:
            key, value = part.split("=", 1)
            last = key.strip().lower()
            out[last] = value.strip()
        elif last is not None:
            out[last] += "," + part
        else:
            raise TriggerSpecError(f"trigger field {part!r} has no '=': write key=value")
    return out


def _build(kind: str, values: dict[str, Any]) -> Trigger:
    cls = TRIGGER_KINDS.get(kind)
    if cls is None:
        raise TriggerSpecError(f"unknown trigger kind {kind!r}: use one of {', '.join(TRIGGER_KINDS)} "
                               f"or a preset ({', '.join(PRESETS)})")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise TriggerSpecError(f"{kind} trigger has no field {key!r}: fields are {', '.join(known)}")
        target = known[key].type
        try:
            if target in ("int", int):
                kwargs[key] = int(value)
            elif target in ("float", float):
                kwargs[key] = float(Fraction(str(value)))
            elif target in ("bool", bool):
                if str(value).lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                kwargs[key] = str(value).lower() in {"true", "1", "yes"}
            else:
                kwargs[key] = str(value)
            if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
                raise ValueError(value)
        except (ValueError, TypeError, OverflowError, ZeroDivisionError):
            raise TriggerSpecError(f"{kind} trigger field {key}={value!r} is not a valid {target}") from None
    trigger = cls(**kwargs)
    _validate(trigger)
    return trigger


def _validate(trigger: Trigger) -> None:
    """Catch spec errors that do not need an image at parse time rather than mid-run."""
    for name in ("seed", "margin"):
        value = getattr(trigger, name, 0)
        if not 0 <= value < 2**32:
            raise TriggerSpecError(f"{trigger.kind} trigger field {name} must be in 0..{2**32 - 1}, got {value}")
    if isinstance(trigger, PatchTrigger):
        _parse_size(trigger.size)
        fill = trigger.fill.lower()
        if fill.startswith("#") and not _HEX_COLOUR.fullmatch(fill):
            raise TriggerSpecError(f"fill {trigger.fill!r}: a colour is # and six hex digits, e.g. #ff8800")
        if not (fill in _COLOURS or fill in ("checker", "noise") or _HEX_COLOUR.fullmatch(fill)
                or Path(trigger.fill).is_file()):
            raise TriggerSpecError(f"fill {trigger.fill!r}: use white, black, red, green, blue, yellow, grey, "
                                   "checker, noise, #rrggbb or an existing PNG path")
        if trigger.pos not in _CORNERS and len(trigger.pos.split(",")) != 2:
            raise TriggerSpecError(f"pos {trigger.pos!r}: use one of {', '.join(_CORNERS)} or x,y")
    elif isinstance(trigger, BlendTrigger):
        if not 0.0 < trigger.alpha <= 1.0:
            raise TriggerSpecError(f"blend alpha must be in (0, 1], got {trigger.alpha}")
        if trigger.image != "noise" and not Path(trigger.image).is_file():
            raise TriggerSpecError(f"blend image file not found: {trigger.image}")
    elif isinstance(trigger, ImageTrigger):
        for what, path in (("pattern", trigger.pattern), ("mask", trigger.mask)):
            if not path or not Path(path).is_file():
                raise TriggerSpecError(f"image trigger {what} file not found: {path or '(missing)'}")
    elif isinstance(trigger, AdditiveTrigger):
        trigger._eps()
        if trigger.delta != "noise" and not Path(trigger.delta).is_file():
            raise TriggerSpecError(f"additive delta file not found: {trigger.delta}")
        if trigger.delta.endswith(".npy"):
            _load_npy(Path(trigger.delta), "additive delta")
    elif isinstance(trigger, SIGTrigger):
        _check_sig(trigger)
    elif isinstance(trigger, LSBTrigger) and not 1 <= trigger.bits <= 4:
        raise TriggerSpecError(f"lsb bits must be 1..4, got {trigger.bits}")


def parse_trigger(spec: str | os.PathLike[str] | dict[str, Any] | Trigger | Callable[[np.ndarray], np.ndarray]
                  ) -> Trigger:
    """Parse a spec string, a preset name, a dict, a ``.json``/``.yaml`` file with a ``kind`` field,
    ``python:pkg.module:function`` or a function (:class:`CallableTrigger`)."""
    if isinstance(spec, Trigger):
        return spec
    if callable(spec) or str(spec).strip().startswith(CALLABLE_PREFIX):
        # trigger_forms builds on Trigger, defined here: importing it at the top would be a cycle
        from .trigger_forms import CallableTrigger

        return CallableTrigger.from_function(spec) if callable(spec) else CallableTrigger.from_spec(str(spec))
    if isinstance(spec, dict):
        values = {str(k).lower(): v for k, v in spec.items()}
        kind = str(values.pop("kind", values.pop("type", "")))
        return _build(kind, values)
    text = str(spec).strip()
    if text in PRESETS:
        return parse_trigger(PRESETS[text])
    if text.endswith((".json", ".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise TriggerSpecError(f"trigger file not found: {text}")
        try:
            if path.suffix == ".json":
                loaded = json.loads(path.read_text())
            else:
                import yaml
                loaded = yaml.safe_load(path.read_text())
        except Exception as err:  # json and yaml raise different types; both mean a bad file
            raise TriggerSpecError(f"cannot parse trigger file {text}: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise TriggerSpecError(f"trigger file {text} must hold a mapping with a 'kind' field")
        return parse_trigger(loaded)
    kind, _, body = text.partition(":")
    if not kind:
        raise TriggerSpecError("empty trigger spec: e.g. patch:size=3,pos=bottom-right,fill=white")
    if kind.strip().lower() not in TRIGGER_KINDS:
        if CALLABLE_REFERENCE.fullmatch(text):  # never imported without the prefix: running code is asked for by name
            raise TriggerSpecError(f"unknown trigger kind {kind!r}: to use your own function write "
                                   f"{CALLABLE_PREFIX}{text}")
        if kind.strip().lower() == "paired":
            raise TriggerSpecError("a paired trigger is not a spec: pass the triggered images with --triggered-data")
    return _build(kind.strip().lower(), _split_fields(body))
