"""Trigger knowledge in the forms users have besides spec strings: their own function, or triggered images.

* :class:`CallableTrigger`: a transform in the user's code (a WaNet-style warp, a colour filter), named on the
  command line as ``python:pkg.module:function`` (the prefix is the only way a spec imports code, so nothing
  runs unless named) or passed as a function in Python (``agme_hub.clean(model, data, trigger=my_function)``).
* :class:`PairedTrigger`: triggered twins of given clean images (``--triggered-data``, a folder paired by file
  name with ``--data``; :func:`agme_hub.data.load_paired_folders`), for a user who found poisoned samples.

``agme_hub.triggers.parse_trigger`` returns either, so the engine, the metrics and the bench take them as any
other :class:`~agme_hub.triggers.Trigger`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .errors import AgmeError, PairedDataError, ShapeMismatchError, TriggerCallableError
from .triggers import CALLABLE_REFERENCE, CALLABLE_PREFIX, Trigger

__all__ = ["CallableTrigger", "PairedTrigger"]


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}".rstrip(": ")


def _import_callable(ref: str) -> Callable[[np.ndarray], np.ndarray]:
    """``pkg.module:function`` -> the function, importable from the current folder as ``python -m`` would."""
    if not CALLABLE_REFERENCE.fullmatch(ref):
        raise TriggerCallableError(f"trigger {CALLABLE_PREFIX}{ref}: write {CALLABLE_PREFIX}pkg.module:function")
    module_name, _, attribute = ref.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # the user's module may fail in any way while it loads
        raise TriggerCallableError(f"cannot import the trigger module {module_name!r}: {_first_line(err)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise TriggerCallableError(f"the trigger module {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TriggerCallableError(f"trigger {CALLABLE_PREFIX}{ref} is a {type(obj).__name__}, not a function")
    return obj


@dataclass(frozen=True, eq=False)
class CallableTrigger(Trigger):
    """The user's own transform: a function uint8 ``(N, H, W, C)`` -> uint8 of the same shape (a warp, a filter).

    ``parse_trigger("python:pkg.module:function")`` imports it (only that prefix runs code);
    ``parse_trigger(my_function)`` wraps a function given in Python. ``name`` is ``module:qualified.name``,
    which reports record as the spec ``python:<name>``. Every call is checked: an exception or an output of
    another shape or dtype is a :class:`TriggerCallableError` naming the function.
    """

    kind: ClassVar[str] = "python"
    function: Callable[[np.ndarray], np.ndarray] = field(default=lambda x: x, repr=False)
    name: str = ""

    @classmethod
    def from_function(cls, function: Callable[[np.ndarray], np.ndarray]) -> "CallableTrigger":
        module = getattr(function, "__module__", None) or type(function).__module__
        qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
        return cls(function=function, name=f"{module}:{qualname}")

    @classmethod
    def from_spec(cls, spec: str) -> "CallableTrigger":
        """``python:pkg.module:function``: imports the module (from the current folder too, as ``python -m``)."""
        ref = spec.strip()[len(CALLABLE_PREFIX):].strip()
        return cls(function=_import_callable(ref), name=ref)

    @property
    def spec(self) -> str:
        return f"{CALLABLE_PREFIX}{self.name}"

    def apply(self, images: np.ndarray) -> np.ndarray:
        single = images.ndim == 3
        batch = images[None] if single else images
        if batch.ndim != 4 or batch.dtype != np.uint8:
            raise ShapeMismatchError(f"triggers stamp uint8 (N,H,W,C) images, got {batch.dtype} {batch.shape}")
        try:
            out = self.function(batch.copy())  # a copy: a function that writes in place must not change D
        except AgmeError:
            raise
        except Exception as err:  # the user's code may fail in any way: one line, its own exit code
            raise TriggerCallableError(f"trigger {self.spec} raised {_first_line(err)}") from None
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != batch.shape:
            got = (f"{out.dtype} {tuple(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__)
            raise TriggerCallableError(f"trigger {self.spec} must return uint8 images of shape {tuple(batch.shape)}, "
                                       f"got {got}")
        return out[0] if single else out


def _pixels_key(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


@dataclass(frozen=True, eq=False)
class PairedTrigger(Trigger):
    """Triggered twins given as images, not as a rule (``--triggered-data``: poisoned samples a user found).

    ``apply`` looks each image up by its pixels and returns its twin; an image it was not given is a
    :class:`PairedDataError`. Augmented copies therefore cannot be stamped: ``applies_to_any_image`` is
    False and the engine augments each clean image and its twin together. Of identical clean images the
    first pair wins.
    """

    kind: ClassVar[str] = "paired"
    applies_to_any_image: ClassVar[bool] = False
    clean: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8), repr=False)
    triggered: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8), repr=False)
    source: str = "pairs"
    _index: dict[bytes, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.clean.shape != self.triggered.shape or self.clean.ndim != 4 or self.clean.dtype != np.uint8
                or self.triggered.dtype != np.uint8):
            raise PairedDataError(f"paired images must be two uint8 (N,H,W,C) arrays of one shape, got "
                                  f"{self.clean.dtype} {self.clean.shape} and {self.triggered.dtype} "
                                  f"{self.triggered.shape}")
        for i in range(len(self.clean) - 1, -1, -1):  # backwards: the first of identical images wins
            self._index[_pixels_key(self.clean[i])] = i

    @classmethod
    def from_pairs(cls, clean: np.ndarray, triggered: np.ndarray, source: str = "pairs") -> "PairedTrigger":
        """``triggered[i]`` is the twin of ``clean[i]``; grey ``(N, H, W)`` arrays are taken as one channel."""
        clean, triggered = (np.asarray(a)[..., None] if np.ndim(a) == 3 else np.asarray(a) for a in (clean, triggered))
        return cls(clean=clean, triggered=triggered, source=source)

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.source},pairs={len(self.clean)}"

    def apply(self, images: np.ndarray) -> np.ndarray:
        single = images.ndim == 3
        batch = images[None] if single else images
        if batch.ndim != 4 or batch.shape[1:] != self.clean.shape[1:]:
            raise PairedDataError(f"the paired trigger holds {self.clean.shape[1:]} images, got {batch.shape[1:]}")
        rows = [self._index.get(_pixels_key(image)) for image in batch]
        missing = sum(row is None for row in rows)
        if missing:
            raise PairedDataError(f"{missing} of {len(batch)} images have no triggered twin in {self.source}: "
                                  "a paired trigger knows only the images it was given")
        out = self.triggered[np.array(rows, np.int64)]
        return out[0] if single else out
