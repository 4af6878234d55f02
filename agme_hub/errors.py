"""Contains all of agme's errors.

Each class maps to one exit code and one line of message; the CLI prints ``str(error)`` and exits
with ``error.exit_code``. Messages say what went wrong and what to do next.
"""

from __future__ import annotations

__all__ = [
    "AgmeError", "UsageError", "DataError", "DatasetNotInstalledError", "PairedDataError", "TriggerSpecError",
    "TriggerCallableError",
    "ShapeMismatchError", "ClassMismatchError", "UnsupportedFormatError", "UnsupportedArchitectureError",
    "PickleRefusedError", "LayerNotFoundError", "MissingExtraError", "DeviceError", "RepoNotFoundError",
    "GatedRepoError", "UnauthorizedError", "RevisionNotFoundError", "OfflineCacheMissError", "NetworkError",
    "OutputExistsError", "PushError", "JobsFileError", "BatchFailedError", "InvalidConfigError",
    "InvalidWeightsError", "OutputOverlapsInputError", "OutputNotWritableError", "ReportError",
    "WriteVerificationError", "CardValidationError",
]  # and one_line(), the helper that gives an error's first line


def one_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name when it has none): what the CLI prints."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class AgmeError(Exception):
    """Base of every error agme raises on purpose. ``exit_code`` is unique per class."""

    exit_code: int = 1


# INPUT ERRORS
class UsageError(AgmeError, ValueError):
    """Raised when options contradict each other or a value is out of range."""

    exit_code = 2


class DataError(AgmeError, ValueError):
    """Raised when an image set cannot be read: missing or empty folder, unreadable image, bad .npz."""

    exit_code = 3


class DatasetNotInstalledError(DataError):
    """Raised when a built-in dataset name is known but the package that ships it is missing."""

    exit_code = 4


class PairedDataError(DataError):
    """Raised when triggered images do not pair with the clean ones (a missing or extra twin, another size),
    or when a paired trigger is asked for the twin of an image it was not given."""

    exit_code = 8


class TriggerSpecError(AgmeError, ValueError):
    """Raised when a trigger spec cannot be parsed or its pattern/mask cannot be used."""

    exit_code = 5


class TriggerCallableError(TriggerSpecError):
    """Raised when a trigger given as the user's own function cannot be imported, raises, or returns other than
    uint8 images of the shape it was given."""

    exit_code = 9


class ShapeMismatchError(AgmeError, ValueError):
    """Raised when images, triggers or keys have shapes that do not fit the model."""

    exit_code = 6


class ClassMismatchError(AgmeError, ValueError):
    """Raised when a class index or label name does not exist in the model or the data."""

    exit_code = 7


# MODEL ERRORS
class UnsupportedFormatError(AgmeError, ValueError):
    """Raised when a checkpoint is not in timm format (or not a checkpoint at all)."""

    exit_code = 10


class UnsupportedArchitectureError(AgmeError, ValueError):
    """Raised when the engine cannot edit a model: no editable layer, or a layer kind it refuses."""

    exit_code = 11


class InvalidConfigError(UnsupportedFormatError):
    """Raised when config.json is a timm config but a field is unusable (type, range, encoding); names the field."""

    exit_code = 14


class InvalidWeightsError(UnsupportedFormatError):
    """Raised when the weights hold NaN/Inf values or do not fit the architecture; names the tensor."""

    exit_code = 15


class PickleRefusedError(AgmeError, PermissionError):
    """Raised when only pickle weights (.bin/.pth) exist and ``--allow-pickle`` was not given."""

    exit_code = 12


class LayerNotFoundError(AgmeError, LookupError):
    """Raised when a layer name or glob given by the user matches no module of the model."""

    exit_code = 13


class MissingExtraError(AgmeError, ImportError):
    """Raised when a model needs an optional extra that is not installed (``pip install "agme[transformers]"``)."""

    exit_code = 16


class DeviceError(AgmeError, ValueError):
    """Raised when ``--device`` is not a device spec agme knows, or names a device this machine does not have."""

    exit_code = 17


# HUB ERRORS
class RepoNotFoundError(AgmeError, LookupError):
    """Raised when a Hub repo or local folder does not exist."""

    exit_code = 20


class GatedRepoError(AgmeError, PermissionError):
    """Raised when a Hub repo is gated and the token has no access."""

    exit_code = 21


class UnauthorizedError(AgmeError, PermissionError):
    """Raised when the Hub refuses the token (or its absence) for a read or a write."""

    exit_code = 22


class RevisionNotFoundError(AgmeError, LookupError):
    """Raised when a branch, tag or commit of a Hub repo does not exist."""

    exit_code = 23


class OfflineCacheMissError(AgmeError, FileNotFoundError):
    """Raised when offline mode is on and the local cache does not hold what is needed."""

    exit_code = 24


class NetworkError(AgmeError, ConnectionError):
    """Raised when the Hub cannot be reached or answers with a server error."""

    exit_code = 25


class PushError(AgmeError, RuntimeError):
    """Raised when a push to the Hub fails; nothing was committed."""

    exit_code = 26


# OUTPUT ERRORS
class OutputExistsError(AgmeError, FileExistsError):
    """Raised when the output folder holds files agme did not write and ``--yes`` was not given."""

    exit_code = 30


class JobsFileError(AgmeError, ValueError):
    """Raised when a batch jobs file is invalid; the message names the entry and the field."""

    exit_code = 31


class BatchFailedError(AgmeError, RuntimeError):
    """Raised when a batch ran but some of its jobs failed; the summary says which."""

    exit_code = 32


class OutputOverlapsInputError(AgmeError, ValueError):
    """Raised when the output folder is, contains or lies inside an input (the source model or the data)."""

    exit_code = 33


class OutputNotWritableError(AgmeError, PermissionError):
    """Raised when the output folder (or the folder it would be created in) cannot be written."""

    exit_code = 34


class ReportError(AgmeError, ValueError):
    """Raised when an output folder's agme_report.json lacks what a command needs (e.g. metrics for a card)."""

    exit_code = 35


class WriteVerificationError(AgmeError, OSError):
    """Raised when a written weights file, read back, does not hold what the model holds (disk or I/O fault)."""

    exit_code = 36


class CardValidationError(AgmeError, ValueError):
    """Raised when a rendered model card does not validate (metadata the Hub or agme needs is missing)."""

    exit_code = 37
