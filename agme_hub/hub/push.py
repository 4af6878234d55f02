"""Publish an output folder to the Hub as one commit.

    result = push_folder("resnet18-agme", "me/resnet18-agme", create_pr=False)
    if result.skipped: ...          # the Hub already holds exactly these files: no commit was made
    print(result.pr_url or result.commit_url)

Rules: pickle files are never uploaded; only files that differ from the target revision go into the commit
(compared by sha256 for LFS files and by git blob id otherwise, from ``model_info(files_metadata=True)``);
a README.md on the Hub that agme did not write (no ``AGME_MARKER``) is never overwritten on the branch: the
push then goes as a pull request and ``PushResult.reason`` says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import AGME_MARKER, CARD_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAMES, REPORT_NAME, WEIGHTS_NAME
from ..errors import AgmeError, PushError
from ..report import same_result
from .client import hub_timeout, make_hub_api, map_hub_error

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["PushResult", "push_folder"]

_logger = logging.getLogger(__name__)

# Suffixes of files that may hold pickle data; such files are never published.
_PICKLE_SUFFIXES = frozenset({".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt"})
_DEFAULT_MESSAGE = "Upload model cleaned with agme"


@dataclass(frozen=True)
class PushResult:
    """What a push did.

    Attributes:
        repo_id: the target repo.
        repo_url: its URL.
        commit_url: the new commit, or None when skipped.
        pr_url: the pull request when the push went as one.
        commit_sha: the new commit's sha; when skipped, the sha that already holds these files.
        skipped: True when every file already matched, so no commit was made.
        reason: one line saying what happened and why (e.g. why the push became a pull request).
        files: the paths that went into the commit (empty when skipped).
    """

    repo_id: str
    repo_url: str
    commit_url: str | None
    pr_url: str | None
    commit_sha: str | None
    skipped: bool
    reason: str
    files: tuple[str, ...] = ()


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed and commit the changed files of ``folder`` in one commit.

    Args:
        folder: an agme output folder; it must hold model.safetensors and config.json.
        repo_id: ``org/name`` to publish to.
        token: Hub token with write access; None uses the client's (``HF_TOKEN``, ``hf auth login``).
        private: create the repo private (an existing repo keeps its visibility).
        create_pr: open a pull request instead of committing to the branch.
        revision: the branch to commit to (or to open the pull request against); None for the default branch.
        commit_message: the commit title; a default names agme.
        api: the client to use; built with ``library_name="agme"`` when None.
        endpoint: Hub URL when ``api`` is None; None uses huggingface_hub's (``HF_ENDPOINT``).

    Returns:
        What was pushed, or that nothing needed pushing.

    Raises:
        PushError: the folder is incomplete or the Hub rejected the commit; nothing was committed.
        UnauthorizedError: the token cannot write to the repo.
        RevisionNotFoundError: ``revision`` is not a branch of the repo.
        NetworkError: the Hub cannot be reached.
    """
    folder = Path(folder)
    local = _publishable_files(folder)
    api = api if api is not None else make_hub_api(token=token, endpoint=endpoint)
    target = revision or "main"
    try:
        repo_url = str(api.create_repo(repo_id, token=token, private=private, exist_ok=True))
        info = api.model_info(repo_id, revision=target, files_metadata=True, token=token, timeout=hub_timeout())
        remote = {s.rfilename: s for s in info.siblings or ()}
        changed = tuple(path for path in local if not _same_file(local[path], remote.get(path)))
        if not changed or _only_run_details_differ(api, repo_id, local, remote, changed, revision=str(info.sha),
                                                   token=token):
            reason = f"all {len(local)} files already match {repo_id}@{target}; no commit made"
            if changed:
                reason = (f"the model, config and results already match {repo_id}@{target} (only timings "
                          "differ); no commit made")
            _logger.info(reason)
            return PushResult(repo_id, repo_url, None, None, info.sha, True, reason)
        reason = f"{len(changed)} of {len(local)} files changed"
        if (CARD_NAME in changed and CARD_NAME in remote and not create_pr and not target.startswith("refs/pr/")
                and not _is_agme_card(api, repo_id, revision=str(info.sha), token=token)):
            create_pr = True
            reason += f"; pushed as a pull request because {CARD_NAME} on {repo_id} was not written by agme"
        operations = _operations(local, changed)
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message or _DEFAULT_MESSAGE, revision=revision,
            create_pr=create_pr, parent_commit=info.sha, token=token,
        )
    except AgmeError:
        raise
    except Exception as err:
        mapped = map_hub_error(err, repo_id=repo_id, revision=revision, token=token, action="push")
        if mapped is None:
            raise
        raise mapped from err
    pr_url = getattr(commit, "pr_url", None)
    reason = f"{reason}; {'opened ' + str(pr_url) if pr_url else 'committed to ' + target}"
    _logger.info("pushed %s: %s", repo_id, reason)
    return PushResult(repo_id, repo_url, commit.commit_url, pr_url, commit.oid, False, reason, changed)


def _publishable_files(folder: Path) -> dict[str, Path]:
    """Map repo path -> local file for everything that may be published, sorted by path."""
    if not folder.is_dir():
        raise PushError(f"nothing to push: {folder} is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        # Hidden entries are tool state (.cache/huggingface, .locks, editor files), never model content.
        if any(part.startswith(".") for part in rel.parts):
            continue
        # A link may point anywhere (a token file, /etc/shadow): publishing its target could leak a secret.
        if path.is_symlink():
            raise PushError(f"{rel} in {folder} is a symbolic link; agme never publishes links (their target may "
                            "be a secret): remove it or copy the file in; nothing was pushed")
        if not path.is_file():
            continue
        if path.suffix.lower() in _PICKLE_SUFFIXES or path.name in PICKLE_WEIGHTS_NAMES:
            _logger.warning("not pushing %s: pickle files are never published", rel)
            continue
        files[rel.as_posix()] = path
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if name not in files]
    if missing:
        raise PushError(f"{folder} has no {' or '.join(missing)}; agme publishes only complete model folders")
    return files


def _same_file(path: Path, remote: Any) -> bool:
    """Whether a local file equals a Hub sibling listed with ``files_metadata=True``."""
    if remote is None:
        return False
    if remote.size is not None and remote.size != path.stat().st_size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha256 == _digest(path, hashlib.sha256())
    if remote.blob_id:
        # The Hub reports a non-LFS file by its git object id: sha1 over "blob <size>\0" + content.
        return bool(remote.blob_id == _digest(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size)))
    return False


def _digest(path: Path, digest: Any) -> str:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return str(digest.hexdigest())


def _is_agme_card(api: HfApi, repo_id: str, *, revision: str, token: str | None) -> bool:
    with tempfile.TemporaryDirectory(prefix="agme-card-") as tmp:
        card = api.hf_hub_download(repo_id, CARD_NAME, revision=revision, cache_dir=tmp, token=token)
        return AGME_MARKER in Path(card).read_text(encoding="utf-8", errors="replace")


def _only_run_details_differ(api: HfApi, repo_id: str, local: dict[str, Path], remote: dict[str, Any],
                             changed: tuple[str, ...], *, revision: str, token: str | None) -> bool:
    """Whether the changed files are only the report and card, and the reports differ only in run details.

    Two runs that made the same model differ only in the report's run details (``report.RUN_DETAILS``: how
    long each stage took, where the folder was pushed); the card lines rendered from those differ too. Such a
    push is skipped.
    """
    if REPORT_NAME not in changed or not set(changed) <= {REPORT_NAME, CARD_NAME} or REPORT_NAME not in remote:
        return False
    if CARD_NAME in changed and CARD_NAME not in remote:
        return False
    with tempfile.TemporaryDirectory(prefix="agme-report-") as tmp:
        path = api.hf_hub_download(repo_id, REPORT_NAME, revision=revision, cache_dir=tmp, token=token)
        try:
            theirs = json.loads(Path(path).read_text(encoding="utf-8"))
            ours = json.loads(local[REPORT_NAME].read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    if not isinstance(theirs, dict) or not isinstance(ours, dict):
        return False
    if not same_result(ours, theirs):
        return False
    # The card is rendered from the report: with equal reports it differs only in the timings it shows.
    return CARD_NAME not in changed or _is_agme_card(api, repo_id, revision=revision, token=token)


def _operations(local: dict[str, Path], changed: tuple[str, ...]) -> list[Any]:
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local[path])) for path in changed]
