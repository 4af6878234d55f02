"""The baseline registry and the one entry point, ``run_baseline``.

Each defence is a function registered with ``@register_baseline(name, config=ConfigClass)``. The
runner validates the inputs, turns the caller's keyword overrides into the defence's frozen config
dataclass (unknown keys are an error, not silently ignored), copies the model, seeds every random
source, times the defence and records every hyperparameter and where its value came from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn

from ...errors import ClassMismatchError, ShapeMismatchError, UsageError

__all__ = [
    "DefenseResult", "Outcome", "BaselineConfig", "register_baseline", "run_baseline", "list_baselines",
    "predict", "accuracy", "num_classes_of", "pixel_stats", "get_classifier", "forward_features", "forward_head",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefenseResult:
    """What one baseline defence returns.

    Example:
        >>> result = run_baseline("ft", model, images, labels, seed=0)  # doctest: +SKIP
        >>> result.model if result.applicable else result.reason  # doctest: +SKIP
    """

    name: str  # "ft", "fp", "clp", "nc", "ftsam"
    model: nn.Module | None  # the defended copy (the input model is never modified); None when not applicable
    applicable: bool
    reason: str  # why not applicable, or ""
    seconds: float  # wall seconds of the defence alone
    hparams: dict[str, Any]  # every hyperparameter used, and how it was chosen


@dataclass(frozen=True)
class Outcome:
    """What a registered defence function hands back to the runner (which adds name, time and config)."""

    model: nn.Module | None
    applicable: bool = True
    reason: str = ""
    chosen: dict[str, Any] = field(default_factory=dict)  # values chosen at run time, with their evidence

    @classmethod
    def not_applicable(cls, reason: str, **chosen: Any) -> Outcome:
        return cls(model=None, applicable=False, reason=reason, chosen=dict(chosen))


@dataclass(frozen=True)
class BaselineConfig:
    """Base of every defence config: frozen, all fields defaulted, each default explained in ``SOURCES``."""

    SOURCES: ClassVar[dict[str, str]] = {}


class _DefenseFn(Protocol):
    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: Any, *,
        generator: torch.Generator,
    ) -> Outcome: ...


@dataclass(frozen=True)
class _Entry:
    fn: _DefenseFn
    config: type[BaselineConfig]


# name -> defence function and its config class, filled by @register_baseline.
_BASELINES: dict[str, _Entry] = {}


def register_baseline(
    name: str, *, config: type[BaselineConfig]
) -> Callable[[_DefenseFn], _DefenseFn]:
    """Register a defence under ``name``; warn when an existing entry is replaced.

    Args:
        name: the short name callers pass to ``run_baseline``.
        config: the frozen dataclass holding the defence's hyperparameters and their defaults.
    """

    def decorator(fn: _DefenseFn) -> _DefenseFn:
        if name in _BASELINES:
            warnings.warn(f"baseline {name!r} registered twice; the later one wins", stacklevel=2)
        _BASELINES[name] = _Entry(fn=fn, config=config)
        return fn

    return decorator


def list_baselines() -> list[str]:
    """Names of the registered baselines, sorted."""
    return sorted(_BASELINES)


def _lookup(name: str) -> _Entry:
    if name not in _BASELINES:
        close = difflib.get_close_matches(name, list(_BASELINES), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"Unknown baseline {name!r}; choose one of {', '.join(list_baselines())}.{hint}")
    return _BASELINES[name]


def _make_config(cls: type[BaselineConfig], overrides: dict[str, Any]) -> BaselineConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UsageError(
            f"Unknown hyperparameter(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid ones are {', '.join(sorted(names))}."
        )
    return cls(**overrides)


# timm's model methods, typed once here (``nn.Module.__getattr__`` types every attribute as a Tensor).
def get_classifier(model: nn.Module) -> nn.Module | None:
    """The timm classifier module, or None for a model without ``get_classifier``."""
    if not hasattr(model, "get_classifier"):
        return None
    return cast(Callable[[], nn.Module], model.get_classifier)()


def forward_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_features``: the last feature map (or tokens) before the head."""
    return cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)(x)


def forward_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_head``: pooling, head layers and classifier."""
    return cast(Callable[[torch.Tensor], torch.Tensor], model.forward_head)(x)


def num_classes_of(model: nn.Module) -> int:
    """Number of output classes, read from the timm classifier (falls back to ``model.num_classes``)."""
    head = get_classifier(model)
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise UsageError("Cannot tell the number of classes: the model has no Linear/Conv2d classifier.")


def _validate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeMismatchError(f"images must be a float tensor (N, C, H, W); got {shape}.")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.long:
        raise ShapeMismatchError("labels must be a LongTensor of shape (N,); convert with labels.long().")
    if len(images) == 0 or len(images) != len(labels):
        raise ShapeMismatchError(f"need as many labels as images, at least one; got {len(images)} and {len(labels)}.")
    n_classes = num_classes_of(model)
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ClassMismatchError(
            f"labels must lie in [0, {n_classes}) for this model; got {int(labels.min())}..{int(labels.max())}."
        )


def _sources(config: BaselineConfig, overrides: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in dataclasses.fields(config):
        if f.name in overrides:
            out[f.name] = "caller override"
        else:
            out[f.name] = type(config).SOURCES.get(f.name, "fixed default")
    return out


def run_baseline(
    name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, **overrides: Any
) -> DefenseResult:
    """Run one baseline defence on a copy of ``model`` with the clean-image budget ``images``/``labels``.

    Args:
        name: one of ``list_baselines()``.
        model: a timm classifier; never modified.
        images: preprocessed clean images (N, C, H, W), the whole budget the defence may use.
        labels: their true classes, LongTensor (N,).
        seed: seeds every random choice (batch order, augmentation, dropout, trigger stamping).
        **overrides: hyperparameters replacing the defence's defaults (see its config class).

    Returns:
        A ``DefenseResult``; ``hparams`` holds every config field, the values chosen at run time and
        ``chosen_by`` (where each value came from).

    Raises:
        UsageError: unknown baseline name or hyperparameter.
        ShapeMismatchError: images/labels of the wrong shape or type.
        ClassMismatchError: a label outside the model's classes.
    """
    entry = _lookup(name)
    config = _make_config(entry.config, overrides)
    _validate(model, images, labels)
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    # The copy is the defence's to change; the caller's model keeps its weights, mode and hooks.
    work = copy.deepcopy(model).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    # fork_rng keeps the caller's global RNG untouched while dropout etc. see a seeded stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        outcome = entry.fn(work, images, labels, config, generator=generator)
    seconds = time.perf_counter() - start
    if outcome.model is not None:
        outcome.model.eval()
    hparams: dict[str, Any] = {**dataclasses.asdict(config), "seed": seed, **outcome.chosen}
    hparams["chosen_by"] = _sources(config, overrides)
    _logger.info("baseline %s: applicable=%s in %.1f s", name, outcome.applicable, seconds)
    return DefenseResult(
        name=name, model=outcome.model, applicable=outcome.applicable, reason=outcome.reason,
        seconds=seconds, hparams=hparams,
    )


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes of ``images`` in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        out = [model(images[i:i + batch_size]).argmax(dim=1) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``images``."""
    return float((predict(model, images) == labels).float().mean())


def pixel_stats(
    model: nn.Module, channels: int, *, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation mean/std of the model's input, shaped (1, C, 1, 1), from ``pretrained_cfg`` or overrides.

    A 3-value ImageNet mean on a 1-channel model (timm keeps the RGB default in ``pretrained_cfg``
    when ``in_chans=1``) is averaged to one value, the way timm adapts the stem weights.

    Raises:
        UsageError: the statistics have a channel count that cannot be matched to the images.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    m = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
    s = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))

    def fit(values: tuple[float, ...], what: str) -> torch.Tensor:
        if len(values) == channels:
            t = torch.tensor(values, dtype=torch.float32)
        elif len(values) == 1:
            t = torch.full((channels,), float(values[0]))
        elif channels == 1:
            t = torch.tensor([sum(values) / len(values)], dtype=torch.float32)
        else:
            raise UsageError(f"{what} has {len(values)} values but the images have {channels} channels; pass {what}=.")
        return t.view(1, channels, 1, 1)

    return fit(m, "mean"), fit(s, "std")
