"""One options model, :class:`CleanOptions`, shared by ``agme clean``, batch jobs files and the Python API.

Each field's ``help`` is the text the CLI shows; a jobs-file entry takes exactly these field names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from .constants import DEFAULT_AUGMENT_COPIES, DEFAULT_GAMMA, DEFAULT_TARGET_WEIGHT
from .errors import UsageError

__all__ = ["CleanOptions", "option_help"]

# A Hub repo id, as the Hub accepts it: "org/name", letters, digits, "-", "_", "." (no "--" or "..").
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9_.\-]{1,96}$")


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class CleanOptions:
    """How to clean one model: ``CleanOptions(data="fashion-mnist", trigger="badnets-white-br", target="0")``."""

    # Data
    data: str = _opt("", "Clean, unseen images: an image folder (one sub-folder per class), an .npz with x and y, "
                         "or a built-in set (fashion-mnist, mnist, cifar10-samples).")
    eval_data: str | None = _opt(None, "Held-out images for the before/after metrics; default: the part of --data "
                                       "not used for editing.")
    per_class: int = _opt(10, "Images per class of --data used for editing.")
    eval_per_class: int | None = _opt(None, "Cap the evaluation images per class (default: all).")
    # Backdoor
    trigger: str | None = _opt(None, "The known trigger (spec, preset or JSON/YAML file): with-knowledge mode. "
                                     "Without it a surrogate trigger is reconstructed.")
    target: str | None = _opt(None, "Target class (index or label name); detected when omitted.")
    # Method
    repair: bool = _opt(True, "Keep the target class (weight its clean images in the preserve term).")
    layers: tuple[str, ...] | None = _opt(None, "Module names or globs to edit; default: chosen by cross-validation.")
    lam: float | None = _opt(None, "Ridge of the edit (scale-free); default: chosen by cross-validation.")
    gamma: float = _opt(DEFAULT_GAMMA, "Weight of the forget term against the preserve term.")
    target_weight: float = _opt(DEFAULT_TARGET_WEIGHT, "Repair: weight of clean target-class images.")
    augment_copies: int = _opt(DEFAULT_AUGMENT_COPIES, "Seeded augmented copies of the edit images.")
    bn_stats: str = _opt("keep", "BatchNorm running averages after the edit: keep or recompute.")
    inversion_steps: int = _opt(200, "Adam steps of trigger inversion (no trigger given).")
    seed: int = _opt(0, "Seed of every random choice.")
    # Output
    out: str | None = _opt(None, "Output folder (default ./<name>-agme).")
    yes: bool = _opt(False, "Replace an existing output folder that agme did not write.")
    dry_run: bool = _opt(False, "Resolve the source, list the layers and the files; write nothing.")
    # Hub
    revision: str | None = _opt(None, "Revision of the source repo (branch, tag or commit).")
    push_to: str | None = _opt(None, "Push the result to this Hub repo (ORG/NAME) in one commit.")
    create_pr: bool = _opt(False, "Open a pull request instead of committing to main.")
    private: bool = _opt(False, "Create the target repo as private.")
    token: str | None = _opt(None, "Hugging Face token (default: the usual huggingface_hub resolution).", secret=True)
    offline: bool = _opt(False, "Use the local Hub cache only.")
    allow_pickle: bool = _opt(False, "Allow .bin/.pth weights (loaded with torch.load(weights_only=True)).")

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise UsageError(f"--per-class must be at least 1, got {self.per_class}")
        if self.eval_per_class is not None and self.eval_per_class < 1:
            raise UsageError(f"--eval-per-class must be at least 1, got {self.eval_per_class}")
        # NaN passes every "<= 0" test and infinity every ">= 0": both must be refused by name.
        for flag, value in (("--lam", self.lam), ("--gamma", self.gamma), ("--target-weight", self.target_weight)):
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{flag} must be a finite number, got {value}")
        if self.lam is not None and self.lam <= 0:
            raise UsageError(f"--lam must be > 0, got {self.lam}")
        if self.gamma < 0 or self.target_weight <= 0 or self.augment_copies < 0:
            raise UsageError("--gamma must be >= 0, --target-weight > 0 and --augment-copies >= 0")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        if self.inversion_steps < 0:
            raise UsageError(f"--inversion-steps must be >= 0, got {self.inversion_steps}")
        if self.push_to is not None and (not _REPO_ID.fullmatch(self.push_to) or ".." in self.push_to
                                         or "--" in self.push_to):
            raise UsageError(f"--push-to must be a Hub repo id ORG/NAME, got {self.push_to!r}")
        if self.bn_stats not in ("keep", "recompute"):
            raise UsageError(f"--bn-stats must be keep or recompute, got {self.bn_stats!r}")
        if self.create_pr and not self.push_to:
            raise UsageError("--create-pr needs --push-to")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "options") -> "CleanOptions":
        """Build from a mapping (a jobs-file entry); unknown fields and wrong types name the field."""
        hints = get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UsageError(f"{where}: unknown field {key!r}")
            if known[name].metadata.get("secret") and value is not None and not isinstance(value, str):
                # never echo a secret, not even a malformed one, in an error message
                raise UsageError(f"{where}: field {key!r} must be a string (its value is not shown)")
            kwargs[name] = _coerce(value, hints[name], f"{where}: field {key!r}")
        return cls(**kwargs)

    def public_dict(self) -> dict[str, Any]:
        """The options without secrets, for reports and cards."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("secret")}

    def replace(self, **changes: Any) -> "CleanOptions":
        return dataclasses.replace(self, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise UsageError(f"{where} must not be empty")
    try:
        if "tuple" in text:
            return tuple(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if "bool" in text:
            if isinstance(value, bool):
                return value
            raise ValueError
        if "int" in text and "float" not in text:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if "float" in text:
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where} has a value of the wrong type: {value!r} ({text})") from None


def option_help() -> dict[str, str]:
    """Field name -> help text (the CLI reads its flag help from here)."""
    return {f.name: f.metadata["help"] for f in fields(CleanOptions)}
