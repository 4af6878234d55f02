"""The options models, each knob declared once: :class:`MethodOptions` and :class:`CleanOptions`.

``MethodOptions`` holds the method's knobs, which :func:`agme_hub.engine.clean` takes. ``CleanOptions`` is
one run of ``agme clean`` (data, backdoor, the method's knobs, output, Hub), shared by the CLI, batch jobs
files and the Python API. Its method fields are copied from ``MethodOptions`` (default and help), and
:attr:`CleanOptions.method` gives them back as a ``MethodOptions``, so a default, a help text or a check
lives in one place. The CLI generates the flags of ``agme clean`` from these fields (their ``help`` and
``group`` metadata), and :meth:`CleanOptions.to_cli_args` writes options back as flags. A jobs-file
entry takes exactly these field names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import Field, dataclass, field, fields
from typing import Any, get_type_hints

from .constants import (DEFAULT_AUGMENT_COPIES, DEFAULT_CHOOSE_SURROGATES, DEFAULT_FOLDS, DEFAULT_GAMMA,
                        DEFAULT_INVERSION_STEPS, DEFAULT_LAM_GRID, DEFAULT_PROTECT_GRID, DEFAULT_REFIT_CLASSIFIER,
                        DEFAULT_REFIT_LAM, DEFAULT_SELECTION, DEFAULT_SURROGATE_REGION, DEFAULT_SURROGATES,
                        DEFAULT_TARGET_WEIGHT, SELECTION_RULES, SURROGATE_KINDS)
from .devices import check_device_spec
from .errors import UsageError

__all__ = ["MethodOptions", "CleanOptions", "option_help", "cli_flags"]

# A Hub repo id, as the Hub accepts it: "org/name", letters, digits, "-", "_", "." (no "--" or "..").
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9_.\-]{1,96}$")


def _opt(default: Any, help: str, *, group: str, **kwargs: Any) -> Any:
    """A field with its help text and its panel in ``agme clean --help`` (``group``) beside it."""
    return field(default=default, metadata={"help": help, "group": group, **kwargs})


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """The method's knobs: ``clean(model, data, method=MethodOptions(lam=0.1))``, or ``clean(..., lam=0.1)``.

    Defaults come from :mod:`agme_hub.constants`; a bad value (negative, NaN, infinite, unknown) is a
    :class:`~agme_hub.errors.UsageError` that names the knob.
    """

    repair: bool = _opt(True, "Keep the target class (weight its clean images in the preserve term).", group="Method")
    layers: tuple[str, ...] | None = _opt(None, "Module names or globs to edit; default: chosen by cross-validation.",
                                          group="Method")
    lam: float | None = _opt(None, "Ridge of the edit (scale-free); default: chosen by cross-validation.",
                             group="Method")
    gamma: float = _opt(DEFAULT_GAMMA, "Weight of the forget term against the preserve term.", group="Method")
    target_weight: float = _opt(DEFAULT_TARGET_WEIGHT, "Repair: weight of clean target-class images.", group="Method")
    refit_classifier: bool = _opt(DEFAULT_REFIT_CLASSIFIER, "Repair: after an edit upstream of the classifier, re-fit "
                                  "the classifier to the original outputs (forget pairs kept).", group="Method")
    refit_lam: float = _opt(DEFAULT_REFIT_LAM, "Repair: ridge of the classifier re-fit (scale-free, as lam); at "
                            "least 0.1 where D and its copies are fewer than the classifier's inputs.",
                            group="Method")
    augment_copies: int = _opt(DEFAULT_AUGMENT_COPIES, "Seeded augmented copies of the edit images.", group="Method")
    bn_stats: str = _opt("keep", "BatchNorm running averages after the edit: keep or recompute.", group="Method")
    inversion_steps: int = _opt(DEFAULT_INVERSION_STEPS, "Adam steps of trigger inversion (no trigger given).",
                                group="Method")
    seed: int = _opt(0, "Seed of every random choice.", group="Method")
    # Engine only: no flag of `agme clean` (flag=False), reached from Python and the bench.
    folds: int = _opt(DEFAULT_FOLDS, "Folds of the cross-validation that chooses layers and lam.", group="Method",
                      flag=False)
    flip: bool = _opt(False, "Also mirror the augmented copies horizontally.", group="Method", flag=False)
    lam_grid: tuple[float, ...] = _opt(DEFAULT_LAM_GRID, "The lam values cross-validation tries when lam is not given.",
                                       group="Method", flag=False)
    protect_grid: tuple[float | None, ...] = _opt(
        DEFAULT_PROTECT_GRID, "Repair: the null-space constraints cross-validation tries (None: the weight alone).",
        group="Method", flag=False)
    target_weight_grid: tuple[float, ...] | None = _opt(
        None, "Repair: the target-class weights cross-validation tries (None: target_weight alone).", group="Method",
        flag=False)
    selection: str = _opt(
        DEFAULT_SELECTION, "How cross-validation ranks its settings: soft (held-out CA + TA/2 - 2 ASR, each image "
        "counted by its predicted probability of the class), score (the same, each image counted 0 or 1) or bar "
        "(the best CA + TA/2 among those whose held-out ASR is within D's own natural confusion + 2 pt; the lowest "
        "ASR if none is).", group="Method", flag=False)
    surrogates: tuple[str, ...] = _opt(
        DEFAULT_SURROGATES, "no-BDK: the surrogate triggers reconstructed (patch: mask + pattern; full: a bounded "
        "full-image perturbation; warp: a smooth displacement field, made only where random warps reach the "
        "target); all are forgotten together unless choose_surrogates.", group="Method", flag=False)
    choose_surrogates: bool = _opt(
        DEFAULT_CHOOSE_SURROGATES, "no-BDK: let the cross-validation choose which surrogates to forget (each alone or "
        "all together) instead of forgetting all of them.", group="Method", flag=False)
    surrogate_region: bool = _opt(
        DEFAULT_SURROGATE_REGION, "no-BDK: forget the patch surrogate together with its region, its mask filled "
        "with fresh noise on every image (what any sticker in that place could show).", group="Method", flag=False)
    held_out_surrogates: bool = _opt(
        False, "no-BDK: also reconstruct a second draw of the surrogates (seed + 1), never forgotten; the "
        "cross-validation's ASR is the second draw's held-out success, so a chosen edit forgets a trigger it was not "
        "built from.", group="Method", flag=False)

    def __post_init__(self) -> None:
        # Python callers pass lists (layers=["fc"]); keep tuples so the options stay hashable and comparable.
        if self.layers is not None:
            names = (self.layers,) if isinstance(self.layers, str) else self.layers
            object.__setattr__(self, "layers", tuple(str(n) for n in names) or None)
        if not isinstance(self.lam_grid, (list, tuple)) or not self.lam_grid:
            raise UsageError(f"lam_grid must be a non-empty list of numbers, got {self.lam_grid!r}")
        object.__setattr__(self, "lam_grid", tuple(self.lam_grid))
        for name in ("repair", "flip", "refit_classifier", "held_out_surrogates", "surrogate_region",
                     "choose_surrogates"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{_label(name)} must be true or false, got {getattr(self, name)!r}")
        if self.lam is not None:
            _check_number("lam", self.lam, above=0.0)
        _check_number("gamma", self.gamma, at_least=0.0)
        _check_number("target_weight", self.target_weight, above=0.0)
        _check_number("refit_lam", self.refit_lam, above=0.0)
        _check_number("augment_copies", self.augment_copies, at_least=0, whole=True)
        if self.bn_stats not in ("keep", "recompute"):
            raise UsageError(f"{_label('bn_stats')} must be keep or recompute, got {self.bn_stats!r}")
        _check_number("inversion_steps", self.inversion_steps, at_least=1, whole=True)
        _check_number("seed", self.seed, at_least=0, whole=True)
        if self.seed >= 2**32:  # numpy's generators take seeds below 2**32
            raise UsageError(f"{_label('seed')} must be in 0..{2**32 - 1}, got {self.seed}")
        _check_number("folds", self.folds, at_least=2, whole=True)
        for lam in self.lam_grid:
            _check_number("lam_grid", lam, above=0.0)
        if not isinstance(self.protect_grid, (list, tuple)) or not self.protect_grid:
            raise UsageError(f"protect_grid must be a non-empty list, got {self.protect_grid!r}")
        object.__setattr__(self, "protect_grid", tuple(self.protect_grid))
        if self.target_weight_grid is not None:
            if not isinstance(self.target_weight_grid, (list, tuple)) or not self.target_weight_grid:
                raise UsageError(f"target_weight_grid must be None or a non-empty list, got {self.target_weight_grid!r}")
            for weight in self.target_weight_grid:
                _check_number("target_weight_grid", weight, above=0.0)
            object.__setattr__(self, "target_weight_grid", tuple(float(w) for w in self.target_weight_grid))
        if self.selection not in SELECTION_RULES:
            raise UsageError(f"selection must be one of {', '.join(SELECTION_RULES)}, got {self.selection!r}")
        kinds = (self.surrogates,) if isinstance(self.surrogates, str) else self.surrogates
        if not isinstance(kinds, (list, tuple)) or not kinds or any(k not in SURROGATE_KINDS for k in kinds) \
                or len(set(kinds)) != len(kinds):
            raise UsageError(f"surrogates must be distinct names among {', '.join(SURROGATE_KINDS)}, "
                             f"got {self.surrogates!r}")
        object.__setattr__(self, "surrogates", tuple(kinds))
        for share in self.protect_grid:
            if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                      or not 0.0 < share < 1.0):
                raise UsageError(f"protect_grid values must be None or in (0, 1), got {share!r}")

    @classmethod
    def with_overrides(cls, base: MethodOptions | None = None, /, **overrides: Any) -> MethodOptions:
        """``base`` (default: all defaults) with some knobs changed; an unknown knob is named in the error."""
        known = [f.name for f in fields(cls)]
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; the knobs are: {', '.join(known)}"
                raise UsageError(f"unknown method option {name!r}{hint}")
        base = base if base is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base


def _label(name: str) -> str:
    """How a message names a knob: as its flag where ``agme clean`` has one."""
    return name if not _METHOD_FIELDS[name].metadata.get("flag", True) else "--" + name.replace("_", "-")


def _check_number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                  whole: bool = False) -> None:
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
        raise UsageError(f"{_label(name)} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{_label(name)} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise UsageError(f"{_label(name)} must be > {above:g}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise UsageError(f"{_label(name)} must be >= {at_least:g}, got {value!r}")


_METHOD_FIELDS: dict[str, Field[Any]] = {f.name: f for f in fields(MethodOptions)}


def _method(name: str) -> Any:
    """A field of CleanOptions that is the method knob ``name``: its default and help are MethodOptions'."""
    knob = _METHOD_FIELDS[name]
    return field(default=knob.default, metadata=knob.metadata)


@dataclass(frozen=True)
class CleanOptions:
    """How to clean one model: ``CleanOptions(data="fashion-mnist", trigger="badnets-white-br", target="0")``."""

    # Data
    data: str = _opt("", "Clean, unseen images: an image folder (one sub-folder per class), an .npz with x and y, "
                         "or a built-in set (fashion-mnist, mnist, cifar10-samples).", group="Data")
    eval_data: str | None = _opt(None, "Held-out images for the before/after metrics; default: the part of --data "
                                       "not used for editing.", group="Data")
    per_class: int = _opt(10, "Images per class of --data used for editing.", group="Data")
    eval_per_class: int | None = _opt(None, "Cap the evaluation images per class (default: all).", group="Data")
    # Backdoor
    trigger: str | None = _opt(None, "The known trigger (spec, preset, JSON/YAML file, or python:pkg.module:function "
                                     "for your own function of uint8 images): with-knowledge mode. Without it a "
                                     "surrogate trigger is reconstructed.", group="Backdoor")
    triggered_data: str | None = _opt(None, "Triggered twins of the --data images (a folder paired by file name: "
                                            "CLASS/NAME.*), used instead of --trigger; the attack success is measured "
                                            "on the held-out pairs.", group="Backdoor", path=True)
    target: str | None = _opt(None, "Target class (index or label name); detected when omitted.", group="Backdoor")
    # Method: declared in MethodOptions
    repair: bool = _method("repair")
    layers: tuple[str, ...] | None = _method("layers")
    lam: float | None = _method("lam")
    gamma: float = _method("gamma")
    target_weight: float = _method("target_weight")
    refit_classifier: bool = _method("refit_classifier")
    refit_lam: float = _method("refit_lam")
    augment_copies: int = _method("augment_copies")
    bn_stats: str = _method("bn_stats")
    inversion_steps: int = _method("inversion_steps")
    seed: int = _method("seed")
    # Runtime: where and in what batches it runs, not what it computes (the edit agrees across devices and batch
    # sizes within float rounding), so a reproduce command leaves them out, like yes and dry_run.
    device: str = _opt("auto", "Where to run: auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps.",
                       group="Runtime", reproduce=False)
    batch_size: int | None = _opt(None, "Images per forward pass (default: sized to the device and the input size).",
                                  group="Runtime", reproduce=False)
    # Output (yes and dry_run say how to run, not what: a reproduce command leaves them out)
    out: str | None = _opt(None, "Output folder (default ./<name>-agme).", group="Output", path=True)
    yes: bool = _opt(False, "Replace an existing output folder that agme did not write.", group="Output",
                     aliases=("-y",), reproduce=False)
    dry_run: bool = _opt(False, "Resolve the source, list the layers and the files; write nothing.", group="Output",
                         reproduce=False)
    # Hub
    revision: str | None = _opt(None, "Revision of the source repo (branch, tag or commit).", group="Hub")
    push_to: str | None = _opt(None, "Push the result to this Hub repo (ORG/NAME) in one commit.", group="Hub")
    create_pr: bool = _opt(False, "Open a pull request instead of committing to main.", group="Hub")
    private: bool = _opt(False, "Create the target repo as private.", group="Hub")
    token: str | None = _opt(None, "Hugging Face token (default: the usual huggingface_hub resolution).", group="Hub",
                             secret=True)
    offline: bool = _opt(False, "Use the local Hub cache only.", group="Hub")
    allow_pickle: bool = _opt(False, "Allow .bin/.pth weights (loaded with torch.load(weights_only=True)).",
                              group="Dangerous")

    def __post_init__(self) -> None:
        if isinstance(self.per_class, bool) or not isinstance(self.per_class, int) or self.per_class < 1:
            raise UsageError(f"--per-class must be at least 1, got {self.per_class}")
        if self.eval_per_class is not None and (isinstance(self.eval_per_class, bool)
                                                or not isinstance(self.eval_per_class, int) or self.eval_per_class < 1):
            raise UsageError(f"--eval-per-class must be at least 1, got {self.eval_per_class}")
        object.__setattr__(self, "device", check_device_spec(self.device))  # present or not: checked at run time
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 2):
            raise UsageError(f"--batch-size must be a whole number >= 2, got {self.batch_size!r}")
        _ = self.method  # building MethodOptions checks the method's knobs
        if self.push_to is not None and (not _REPO_ID.fullmatch(self.push_to) or ".." in self.push_to
                                         or "--" in self.push_to):
            raise UsageError(f"--push-to must be a Hub repo id ORG/NAME, got {self.push_to!r}")
        if self.create_pr and not self.push_to:
            raise UsageError("--create-pr needs --push-to")
        if self.triggered_data and self.trigger is not None:
            raise UsageError("give the trigger once: --trigger or --triggered-data, not both")
        if self.triggered_data and self.eval_data:
            # the attack success needs a triggered twin of every evaluation image: the held-out pairs have one
            raise UsageError("--triggered-data measures the attack success on the held-out pairs of --data; "
                             "--eval-data has no triggered twins: leave it out")

    @property
    def method(self) -> MethodOptions:
        """The method's knobs of this run, as :func:`agme_hub.engine.clean` takes them."""
        return MethodOptions(**{name: getattr(self, name) for name in _SHARED_FIELDS})

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

    def to_cli_args(self, source: str) -> list[str]:
        """The arguments of ``agme`` that reproduce this run: ``["clean", source, "--data", ...]``.

        Fields at their default are left out, and so are secrets (the token) and ``yes``/``dry_run``.
        ``shlex.join(["agme", *options.to_cli_args(source)])`` is the command a report records.
        """
        args = ["clean", source]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") or f.metadata.get("reproduce") is False or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else f"--no-{f.name.replace('_', '-')}")
            elif isinstance(value, (tuple, list)):
                for item in value:
                    args += [flag, str(item)]
            else:
                args += [flag, str(value)]
        return args


_SHARED_FIELDS = tuple(f.name for f in fields(CleanOptions) if f.name in _METHOD_FIELDS)


def cli_flags(f: Field[Any]) -> list[str]:
    """How ``agme clean`` declares the flag of field ``f``.

    ``--name``; ``--name/--no-name`` for a switch that is on by default (so it can be turned off);
    then the field's short aliases. :meth:`CleanOptions.to_cli_args` writes the same names.
    """
    flag = "--" + f.name.replace("_", "-")
    if f.default is True:
        flag = f"{flag}/--no-{f.name.replace('_', '-')}"
    return [flag, *f.metadata.get("aliases", ())]


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
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf) from a jobs file's .inf
        raise UsageError(f"{where} has a value of the wrong type: {value!r} ({text})") from None


def option_help() -> dict[str, str]:
    """Field name -> help text (the CLI reads its flag help from here)."""
    return {f.name: f.metadata["help"] for f in fields(CleanOptions)}
