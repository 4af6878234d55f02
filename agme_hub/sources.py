"""Turn a SOURCE string into a local snapshot folder plus the commit sha it came from.

    src = resolve_source("timm/resnet18.a1_in1k@main")
    model = checkpoint.load_model(src.local_dir)
    provenance = src.ref  # "timm/resnet18.a1_in1k@<40-hex sha>"

SOURCE is an existing folder (``local-dir:`` prefix optional), a Hub id ``org/name``, ``org/name@rev``,
``hf-hub:org/name[@rev]``, or a timm pretrained name such as ``resnet18.a1_in1k`` (looked up in timm's registry).
Hub sources are pinned: the revision is resolved to a commit sha first and only that commit is downloaded, so
the files and the recorded sha always match. Errors raised by ``huggingface_hub`` become agme errors through
one table, :func:`map_hub_error`, shared with :mod:`agme_hub.hub`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .checkpoint import read_config
from .constants import CARD_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME
from .transformers_format import PROCESSOR_CONFIG_NAME, check_transformers_folder, is_transformers_folder
from .errors import (
    AgmeError,
    GatedRepoError,
    NetworkError,
    OfflineCacheMissError,
    PickleRefusedError,
    PushError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnauthorizedError,
    UnsupportedFormatError,
    UsageError,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["ResolvedSource", "resolve_source", "map_hub_error", "make_hub_api"]

_logger = logging.getLogger(__name__)

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Hub ids are "org/name"; the Hub allows letters, digits, "-", "_" and "." in both parts.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_HTTP_LIBS = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}

HubAction = Literal["read", "push"]


@dataclass(frozen=True)
class ResolvedSource:
    """Where a SOURCE ended up on disk and which exact commit it is.

    Attributes:
        source: the SOURCE string as given.
        kind: ``"hub"`` or ``"local"``.
        repo_id: ``org/name`` for Hub sources, None for folders.
        revision: the 40-hex commit sha the files come from (None for folders).
        requested_revision: the branch, tag or sha asked for (``@rev`` or ``revision=``), None for the default.
        local_dir: the folder holding the files: a cache snapshot named after ``revision``, or the source folder.
        files: every file of the source at that commit (remote listing; in offline mode, the cached files).
        license: the license id from the README card metadata or ``pretrained_cfg``, if any.
        offline: True when the result came from the local cache without asking the Hub.
        dry_run: True when only config.json and README.md were fetched (no weights).
    """

    source: str
    kind: Literal["hub", "local"]
    repo_id: str | None
    revision: str | None
    requested_revision: str | None
    local_dir: Path
    files: tuple[str, ...]
    license: str | None = None
    offline: bool = False
    dry_run: bool = False

    @property
    def ref(self) -> str:
        """``org/name@sha`` for Hub sources (for provenance metadata), the folder path otherwise."""
        return f"{self.repo_id}@{self.revision}" if self.kind == "hub" else str(self.local_dir)


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    offline: bool = False,
    allow_pickle: bool = False,
    cache_dir: str | Path | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> ResolvedSource:
    """Resolve SOURCE to a local folder holding a timm or transformers checkpoint, pinned to one commit.

    Args:
        source: a folder, ``org/name[@rev]``, ``hf-hub:org/name[@rev]`` or a timm pretrained name.
        revision: branch, tag or commit sha; must agree with an ``@rev`` in ``source``.
        token: Hub token; None uses the one huggingface_hub finds (``HF_TOKEN``, ``hf auth login``).
        offline: use the local cache only. ``HF_HUB_OFFLINE=1`` (as huggingface_hub parsed it) turns it on too.
        allow_pickle: fetch and accept pickle weights (``pytorch_model.bin`` ...) when the repo has no safetensors.
        cache_dir: Hub cache folder; None uses huggingface_hub's (``HF_HUB_CACHE``).
        dry_run: resolve the sha and list files, fetching only config.json and README.md.
        endpoint: Hub URL; None uses huggingface_hub's (``HF_ENDPOINT``).

    Returns:
        The resolved source.

    Raises:
        UsageError: contradicting revisions, a malformed id, or a revision given for a folder.
        RepoNotFoundError, RevisionNotFoundError, GatedRepoError, UnauthorizedError, NetworkError: from the Hub.
        OfflineCacheMissError: offline and the cache does not hold the files.
        UnsupportedFormatError: neither a timm checkpoint nor a transformers image classifier (the message names
            what was found).
        PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
    """
    folder = _local_folder(source)
    if folder is not None:
        if revision is not None:
            raise UsageError(f"--revision applies to Hub sources only; {source} is a local folder")
        return _resolve_folder(source, folder, allow_pickle=allow_pickle, dry_run=dry_run)
    repo_id, requested = _parse_hub_source(source, revision=revision)
    offline = offline or _hub_offline_mode()
    try:
        if offline:
            return _resolve_cached(source, repo_id, requested, allow_pickle=allow_pickle,
                                   cache_dir=cache_dir, dry_run=dry_run)
        return _resolve_remote(source, repo_id, requested, token=token, allow_pickle=allow_pickle,
                               cache_dir=cache_dir, dry_run=dry_run, endpoint=endpoint)
    except AgmeError:
        raise
    except Exception as err:
        mapped = map_hub_error(err, repo_id=repo_id, revision=requested, token=token, offline=offline)
        if mapped is None:
            raise
        raise mapped from err


def make_hub_api(*, token: str | None = None, endpoint: str | None = None) -> HfApi:
    """The one way agme builds an ``HfApi``: tagged ``agme/<version>`` in the user agent, as timm does."""
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="agme", library_version=__version__)


# SOURCE parsing
def _local_folder(source: str) -> Path | None:
    text = source.removeprefix("local-dir:")
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if source.startswith("local-dir:") or text.startswith(_PATH_PREFIXES) or path.is_file():
        raise RepoNotFoundError(f"Model folder not found: {path} (SOURCE must be a folder or a Hub id org/name)")
    return None


def _parse_hub_source(source: str, *, revision: str | None) -> tuple[str, str | None]:
    repo_id, has_at, at_revision = source.removeprefix("hf-hub:").partition("@")
    if has_at and not at_revision:
        raise UsageError(f"empty revision after '@' in {source!r}")
    if "/" not in repo_id:
        repo_id = _timm_hub_id(repo_id, source=source)
    if not _REPO_ID.fullmatch(repo_id):
        raise UsageError(f"{source!r} is not a folder, a Hub id (org/name[@rev]) or a timm pretrained name")
    if revision and at_revision and revision != at_revision:
        raise UsageError(f"two different revisions: {source!r} says @{at_revision}, --revision says {revision}")
    return repo_id, revision or at_revision or None


def _timm_hub_id(name: str, *, source: str) -> str:
    """Map a timm pretrained name (``resnet18.a1_in1k``) to the Hub repo that holds its weights."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise RepoNotFoundError(
            f"{source!r} is not a folder, a Hub id (org/name) or a timm pretrained name with Hub weights"
        )
    return str(hub_id)


# the three ways to resolve
def _resolve_folder(source: str, folder: Path, *, allow_pickle: bool, dry_run: bool) -> ResolvedSource:
    files = tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
    _check_timm_folder(folder, files, where=str(folder), allow_pickle=allow_pickle)
    return ResolvedSource(source, "local", None, None, None, folder, files, _read_license(folder), dry_run=dry_run)


def _resolve_remote(
    source: str, repo_id: str, requested: str | None, *, token: str | None, allow_pickle: bool,
    cache_dir: str | Path | None, dry_run: bool, endpoint: str | None,
) -> ResolvedSource:
    from huggingface_hub import snapshot_download

    from . import __version__

    api = make_hub_api(token=token, endpoint=endpoint)
    info = api.model_info(repo_id, revision=requested)
    sha = str(info.sha)
    files = tuple(sorted(s.rfilename for s in info.siblings or ()))
    _logger.info("resolved %s@%s to commit %s (%d files)", repo_id, requested or "default branch", sha, len(files))
    # Pickles are fetched only when they are the sole weights: with safetensors present they are never read.
    fetch_pickle = allow_pickle and WEIGHTS_NAME not in files
    folder = Path(snapshot_download(
        repo_id, revision=sha, allow_patterns=_allow_patterns(allow_pickle=fetch_pickle, dry_run=dry_run),
        cache_dir=cache_dir, token=token, endpoint=endpoint, library_name="agme", library_version=__version__,
    ))
    _remember_ref(folder, requested or "main", sha)
    _check_timm_folder(folder, files, where=f"{repo_id}@{sha[:12]}", allow_pickle=allow_pickle)
    return ResolvedSource(source, "hub", repo_id, sha, requested, folder, files, _read_license(folder),
                          dry_run=dry_run)


def _resolve_cached(
    source: str, repo_id: str, requested: str | None, *, allow_pickle: bool, cache_dir: str | Path | None,
    dry_run: bool,
) -> ResolvedSource:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(
        repo_id, revision=requested, allow_patterns=_allow_patterns(allow_pickle=allow_pickle, dry_run=dry_run),
        cache_dir=cache_dir, local_files_only=True,
    ))
    sha = folder.name  # cache snapshots are named after their commit
    files = tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
    _check_timm_folder(folder, files, where=f"{repo_id}@{sha[:12]} (cached)", allow_pickle=allow_pickle)
    _logger.info("offline: using cached %s@%s", repo_id, sha)
    return ResolvedSource(source, "hub", repo_id, sha, requested, folder, files, _read_license(folder),
                          offline=True, dry_run=dry_run)


def _allow_patterns(*, allow_pickle: bool, dry_run: bool) -> list[str]:
    if dry_run:
        return [CONFIG_NAME, CARD_NAME, PROCESSOR_CONFIG_NAME]
    return [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PROCESSOR_CONFIG_NAME,
            *(PICKLE_WEIGHTS_NAMES if allow_pickle else ())]


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Record ``refs/<revision>`` in the cache, as a download by branch name would.

    We download by sha (so files and sha cannot disagree), which leaves the cache without the branch -> sha
    mapping; without it an offline re-run of ``org/name`` could not find the snapshot.
    """
    if _COMMIT_SHA.fullmatch(revision) or snapshot.parent.name != "snapshots":
        return
    ref_path = snapshot.parent.parent / "refs" / revision
    try:
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=ref_path.parent, delete=False) as tmp:
            tmp.write(sha)
        os.replace(tmp.name, ref_path)
    except OSError as err:
        _logger.warning("could not record %s -> %s in the Hub cache (%s); offline re-runs may miss it",
                        revision, sha[:12], err.__class__.__name__)


# format checks
def _check_timm_folder(folder: Path, files: tuple[str, ...], *, where: str, allow_pickle: bool) -> None:
    try:
        if is_transformers_folder(folder):
            check_transformers_folder(folder, where=where, files=files)
        else:
            read_config(folder)
    except UnsupportedFormatError as err:
        # Name the repo, not the cache path the message was built with.
        raise UnsupportedFormatError(str(err).replace(str(folder), where)) from None
    if WEIGHTS_NAME in files:
        return
    pickles = [name for name in PICKLE_WEIGHTS_NAMES if name in files]
    if not pickles:
        raise UnsupportedFormatError(f"{where} has config.json but no {WEIGHTS_NAME}")
    if not allow_pickle:
        raise PickleRefusedError(
            f"{where} holds only pickle weights ({pickles[0]}); loading pickle can run code. Ask for "
            f"{WEIGHTS_NAME}, or pass --allow-pickle to load it with torch.load(weights_only=True)."
        )


def _read_license(folder: Path) -> str | None:
    """The license id from the README card metadata, else from config.json's pretrained_cfg."""
    card = folder / CARD_NAME
    if card.is_file():
        from huggingface_hub.repocard import metadata_load

        try:
            meta = metadata_load(card) or {}
        except Exception:  # a broken card must not stop the pull; the license is informational
            _logger.debug("unreadable card metadata in %s", card, exc_info=True)
            meta = {}
        if isinstance(meta.get("license"), str):
            return str(meta["license"])
    try:
        license_id = read_config(folder).get("pretrained_cfg", {}).get("license")
    except (AgmeError, OSError, ValueError, AttributeError):
        return None
    return license_id if isinstance(license_id, str) else None


# huggingface_hub errors -> agme errors
def _hub_offline_mode() -> bool:
    from huggingface_hub import constants as hf_constants

    is_offline = getattr(hf_constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else getattr(hf_constants, "HF_HUB_OFFLINE", False))


class _NeverRaised(Exception):
    """Stands in for an error class the installed huggingface_hub does not have."""


def _hub_error(name: str) -> type[BaseException]:
    # huggingface_hub.errors exists since 0.23; older releases kept these in huggingface_hub.utils.
    for module_name in ("huggingface_hub.errors", "huggingface_hub.utils"):
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls
    return _NeverRaised


@dataclass(frozen=True)
class _Context:
    repo: str  # "org/name" or "org/name@rev"
    action: HubAction
    offline: bool
    detail: str  # first line of the Hub's own message, token removed


def _http_error(ctx: _Context, err: BaseException) -> AgmeError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        access = "write to" if ctx.action == "push" else "read"
        return UnauthorizedError(f"the Hub refused the token (HTTP {status}) to {access} {ctx.repo}; pass a token "
                                 f"with {'write' if ctx.action == 'push' else 'read'} access (--token or HF_TOKEN)")
    if ctx.action == "push":
        return PushError(f"push to {ctx.repo} failed (HTTP {status}: {ctx.detail}); nothing was committed")
    return NetworkError(f"the Hub answered HTTP {status} for {ctx.repo} ({ctx.detail}); try again later")


def _cache_miss(ctx: _Context, err: BaseException) -> AgmeError:
    if ctx.offline:
        return OfflineCacheMissError(f"offline and the cache has no complete snapshot of {ctx.repo}; "
                                     "run once online to fill the cache")
    return NetworkError(f"cannot reach the Hub for {ctx.repo} and the cache does not hold it; check the network")


# Order matters: subclasses before their bases (GatedRepoError < RepositoryNotFoundError,
# LocalEntryNotFoundError < EntryNotFoundError, OfflineModeIsEnabled < ConnectionError).
_HUB_ERROR_TABLE: list[tuple[str, Callable[[_Context, BaseException], AgmeError]]] = [
    ("GatedRepoError", lambda c, e: GatedRepoError(
        f"{c.repo} is gated: accept its conditions on the Hub and pass a token of an account with access")),
    ("RepositoryNotFoundError", lambda c, e: RepoNotFoundError(
        f"{c.repo} not found on the Hub (or private and the token cannot see it); check the id or pass --token")),
    ("RevisionNotFoundError", lambda c, e: RevisionNotFoundError(
        f"revision not found: {c.repo}; check the branch, tag or commit sha")),
    ("LocalEntryNotFoundError", _cache_miss),
    ("EntryNotFoundError", lambda c, e: UnsupportedFormatError(f"{c.repo} lacks a required file ({c.detail})")),
    ("OfflineModeIsEnabled", lambda c, e: OfflineCacheMissError(
        f"offline mode is on and {c.repo} needs the Hub; run once online to fill the cache")),
    ("HFValidationError", lambda c, e: UsageError(f"invalid Hub id or revision {c.repo}: {c.detail}")),
    ("HfHubHTTPError", _http_error),
]


def map_hub_error(
    err: BaseException,
    *,
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    action: HubAction = "read",
    offline: bool = False,
) -> AgmeError | None:
    """Translate an error from huggingface_hub (or its HTTP stack) into the matching agme error.

    Args:
        err: the exception raised by a huggingface_hub call.
        repo_id: the repo the call was about, for the message.
        revision: the revision asked for, if any.
        token: the token in use; it is scrubbed from anything copied out of ``err``.
        action: ``"read"`` (pull) or ``"push"``; decides between NetworkError and PushError and the wording.
        offline: whether the call ran in offline mode (a cache miss is then OfflineCacheMissError).

    Returns:
        The agme error to raise (one-line message, no token), or None when ``err`` is not a Hub error.
    """
    detail = (str(getattr(err, "server_message", "") or err).strip().splitlines() or [""])[0][:200]
    if token:
        detail = detail.replace(token, "***")
    repo = f"{repo_id}@{revision}" if revision else repo_id
    ctx = _Context(repo=repo, action=action, offline=offline, detail=detail or err.__class__.__name__)
    for name, build in _HUB_ERROR_TABLE:
        if isinstance(err, _hub_error(name)):
            return build(ctx, err)
    if _is_connection_error(err):
        return NetworkError(f"cannot reach the Hub for {repo} ({err.__class__.__name__}); check the network "
                            "or use --offline with a filled cache")
    return None


def _is_connection_error(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    # requests/httpx/httpx2 transport errors do not derive from the builtin ConnectionError.
    return any(cls.__module__.split(".")[0] in _HTTP_LIBS and
               any(word in cls.__name__ for word in ("Connect", "Timeout", "Transport", "Network"))
               for cls in type(err).__mro__)
