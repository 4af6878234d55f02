"""Turn a SOURCE string into a local snapshot folder plus the commit sha it came from.

    src = resolve_source("timm/resnet18.a1_in1k@main")
    model = checkpoint.load_model(src.local_dir)
    provenance = src.ref  # "timm/resnet18.a1_in1k@<40-hex sha>"

SOURCE is an existing folder (``local-dir:`` prefix optional), a Hub id ``org/name``, ``org/name@rev``,
``hf-hub:org/name[@rev]``, or a timm pretrained name such as ``resnet18.a1_in1k`` (looked up in timm's registry).
Hub sources are pinned: the revision is resolved to a commit sha first and only that commit is downloaded, so
the files and the recorded sha always match. Errors raised by ``huggingface_hub`` become agme errors through
one table, :func:`agme_hub.hub.client.map_hub_error`, shared with the push side.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .._version import __version__
from ..constants import CARD_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAMES, WEIGHTS_NAME
from ..errors import AgmeError, PickleRefusedError, RepoNotFoundError, UnsupportedFormatError, UsageError
from .checkpoint import read_config
from .client import hub_offline_mode, hub_timeout, make_hub_api, map_hub_error
from .transformers_format import PROCESSOR_CONFIG_NAME, check_transformers_folder, is_transformers_folder

__all__ = ["ResolvedSource", "resolve_source"]

_logger = logging.getLogger(__name__)

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Hub ids are "org/name"; the Hub allows letters, digits, "-", "_" and "." in both parts.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


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
    offline = offline or hub_offline_mode()
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


    api = make_hub_api(token=token, endpoint=endpoint)
    # The revision is sent explicitly, "main" included, as snapshot_download does: mirrors such as olah answer
    # /api/models/ORG/NAME/revision/REV but not the bare /api/models/ORG/NAME.
    info = api.model_info(repo_id, revision=requested or "main", timeout=hub_timeout())
    sha = str(info.sha)
    files = tuple(sorted(s.rfilename for s in info.siblings or ()))
    _logger.info("resolved %s@%s to commit %s (%d files)", repo_id, requested or "default branch", sha, len(files))
    # Pickles are fetched only when they are the sole weights: with safetensors present they are never read.
    fetch_pickle = allow_pickle and WEIGHTS_NAME not in files

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(
            repo_id, revision=sha, allow_patterns=patterns, cache_dir=cache_dir, token=token, endpoint=endpoint,
            library_name="agme", library_version=__version__, etag_timeout=hub_timeout(),
        ))

    # config.json first: a repo agme cannot use is refused before its weights are downloaded.
    folder = download(_allow_patterns(allow_pickle=False, dry_run=True))
    _check_timm_folder(folder, files, where=f"{repo_id}@{sha[:12]}", allow_pickle=allow_pickle)
    if not dry_run:
        folder = download(_allow_patterns(allow_pickle=fetch_pickle, dry_run=False))
    _remember_ref(folder, requested or "main", sha)
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
        raise type(err)(str(err).replace(str(folder), where)) from None
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

