"""Guards around the folders agme writes: which files are agme's, what may be replaced, and with which modes.

The report of a folder agme writes, ``agme_report.json``, lists every other file agme put there with its
sha256 (``output_files``). A folder is agme's (and may be replaced without ``--yes``) only if every entry in it
is the report or one of those files, unchanged: a user's notes added to an earlier output, or an edited card,
make it the user's folder.

    check_output_overlap(out, {"source model": folder, "data": data_path})   # refused even with --yes
    check_output_writable(out)                                               # before any work, not at the end
    check_output_dir(out, yes=False)                                         # the rule above
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..constants import REPORT_NAME
from ..errors import OutputExistsError, OutputNotWritableError, OutputOverlapsInputError, UsageError
from ..report import CleanReport, current_umask

__all__ = [
    "output_files", "record_written", "is_agme_folder", "check_output_dir",
    "check_output_overlap", "check_output_writable", "apply_umask", "restore_interrupted_output",
]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entries(folder: Path) -> list[Path]:
    """Every file, link and folder under ``folder`` (links are not followed), the report excluded."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            if path.relative_to(folder).as_posix() != REPORT_NAME:
                found.append(path)
    return found


def output_files(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file of ``folder`` but the report (all written by agme)."""
    return dict(sorted((p.relative_to(folder).as_posix(), _sha256(p)) for p in _entries(folder)
                       if p.is_file() and not p.is_symlink()))


def _listed(folder: Path) -> dict[str, str] | None:
    """The files the folder's report says agme wrote; None when there is no readable report or no list."""
    try:
        return CleanReport.load(folder).output_files
    except UsageError:
        return None


def record_written(folder: Path, names: Iterable[str]) -> None:
    """Update the report's list after agme rewrote some files of its own folder (``agme card``)."""
    files = _listed(folder)
    if files is None:  # not a folder agme wrote with a list: nothing to vouch for
        return
    for name in names:
        path = folder / name
        if name != REPORT_NAME and path.is_file() and not path.is_symlink():
            files[name] = _sha256(path)
    CleanReport.load(folder).replace(output_files=dict(sorted(files.items()))).write(folder)


def is_agme_folder(folder: Path) -> tuple[bool, str]:
    """(True, "") when every entry of ``folder`` is a file agme wrote, unchanged; else (False, the first other)."""
    files = _listed(folder)
    if files is None:
        return False, f"no {REPORT_NAME} listing the files agme wrote"
    for path in _entries(folder):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(name.startswith(rel + "/") for name in files):
                return False, rel
            continue
        if path.is_symlink() or rel not in files or _sha256(path) != files[rel]:
            return False, rel
    return True, ""


def check_output_dir(out: Path, *, yes: bool) -> None:
    """An existing ``out`` may be replaced only if agme wrote every file in it, or with ``--yes``."""
    if not out.exists() and not out.is_symlink() or yes:
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out or pass --yes")
    if not any(out.iterdir()):
        return
    ours, other = is_agme_folder(out)
    if not ours:
        raise OutputExistsError(f"{out} exists and holds files agme did not write ({other}); choose another --out "
                                "or pass --yes")


def check_output_overlap(out: Path, inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """Refuse an ``out`` that is, contains or lies inside an input: replacing it would delete that input."""
    out = Path(out).expanduser().resolve()
    for what, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if path == out:
            relation = "is"
        elif out in path.parents:
            relation = "contains"
        elif path in out.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputOverlapsInputError(f"--out {out} {relation} the {what} {path}; choose an --out outside it "
                                       "(agme replaces the whole output folder)")


def check_output_writable(out: Path) -> None:
    """Fail now, not after the whole run, when ``out`` could not be created or replaced."""
    out = Path(out).expanduser().absolute()
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputNotWritableError(f"cannot write --out {out}: {parent} is not a folder")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        probe = Path(tempfile.mkdtemp(prefix=".agme-probe-", dir=parent))
    except OSError as err:
        raise OutputNotWritableError(f"cannot write --out {out}: {parent} is not writable "
                                     f"({err.strerror or type(err).__name__}); choose another --out") from None
    probe.rmdir()


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and its content the modes a plain mkdir/open would (mkdtemp and some writers use 0700/0600)."""
    mask = current_umask()
    for path in [folder, *_entries(folder)]:
        if path.is_symlink():
            continue
        with_mode = 0o777 if path.is_dir() else 0o666
        os.chmod(path, with_mode & ~mask)


def restore_interrupted_output(out: Path) -> None:
    """Put back a previous output that a killed run left hidden as ``.NAME.old-PID`` (killed between renames)."""
    if out.exists() or out.is_symlink():
        return
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime) if out.parent.is_dir() else []
    if olds:
        os.replace(olds[-1], out)
        for extra in olds[:-1]:
            shutil.rmtree(extra, ignore_errors=True) if extra.is_dir() else extra.unlink(missing_ok=True)
