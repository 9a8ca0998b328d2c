"""The one atomic writer: an interrupted run never leaves a half-written file, folder or output set.

Files are written to ``<name>.tmp-<pid>``, fsynced and renamed with :func:`os.replace` (atomic on
POSIX and Windows within one file system). A folder (a scene, a checkpoint, an adapter, a
pipeline) is assembled in ``<name>.tmp-<random>/`` and renamed onto ``<name>/`` once complete
(:func:`make_tmp_dir`, :func:`commit_dir`). A set of files that belong together (a generated scene
and its previews) is written all-or-nothing by :func:`write_all`. Standard library (and psutil)
only: no torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import psutil

from midi.data.layout import TMP_MARK

logger = logging.getLogger(__name__)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Yields a temporary sibling of ``path`` open in ``mode`` (``"wb"``, or ``"w"`` for UTF-8 text) and renames it
    onto ``path`` on success. On any exception the temporary file is removed and ``path`` is left untouched; an
    OSError that names no file (``ENOSPC`` from ``write``) is re-raised naming ``path``."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            # Flush to disk before the rename, so a crash never leaves a renamed empty file.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write()/fsync() errors (a full disk) name no file
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Writes ``data`` as indented UTF-8 JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    """Writes UTF-8 text atomically; ``mode`` also sets the permissions (e.g. ``0o755`` for a script)."""
    with atomic_write(path, "w") as f:
        f.write(text)
        if mode is not None:
            os.chmod(f.fileno(), mode)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes bytes, atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_all(files: Sequence[tuple[Path, bytes]]) -> list[Path]:
    """Writes every ``(path, data)`` under a temporary sibling, then renames them all.

    On any failure the temporary files and the files already renamed by this call are removed
    (an older file that one of them replaced is lost too), so no partial set is left. Temporary
    files that a killed run left in the same folders are removed first (:func:`remove_dead_tmp`).

    Raises:
        OSError: the first write or rename that failed, with ``filename`` the final path.
    """
    remove_dead_tmp({Path(path).parent for path, _ in files})
    temps = [path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}") for path, _ in files]
    renamed: list[Path] = []
    current = None
    try:
        for (current, data), tmp in zip(files, temps):
            current.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        for (current, _), tmp in zip(files, temps):
            os.replace(tmp, current)
            renamed.append(current)
    except BaseException as exc:
        for leftover in temps + renamed:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:  # e.g. the folder itself is unusable: nothing was written there
                pass
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(current)) from exc
        raise
    return [path for path, _ in files]


def remove_dead_tmp(folders: Iterable[Path]) -> None:
    """Removes the ``.<name>.tmp-<pid>`` files of :func:`write_all` whose process is gone.

    A kill between the renames leaves the set partial: each removed file is named in a warning,
    with the output it stood for (rerun that scene).
    """
    for folder in folders:
        for tmp in folder.glob(f".*{TMP_MARK}*") if folder.is_dir() else ():
            match = re.fullmatch(rf"\.(.+){re.escape(TMP_MARK)}(\d+)", tmp.name)
            if match and tmp.is_file() and not psutil.pid_exists(int(match[2])):
                tmp.unlink(missing_ok=True)
                logger.warning("%s: removed a temporary file of an interrupted run (pid %s); %s may be missing or "
                               "incomplete: rerun that scene", tmp, match[2], folder / match[1])


def make_tmp_dir(parent: Path, name: str) -> Path:
    """Creates an empty temporary folder ``<parent>/<name>.tmp-<random>``."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}{TMP_MARK}", dir=parent))


def commit_dir(tmp: Path, final: Path) -> Path:
    """Renames the complete temporary folder ``tmp`` onto ``final``, replacing an older folder there.

    The older folder (a previous export, or a leftover of a run that crashed) is first renamed
    aside to ``.<name>.old-<pid>`` and removed after the swap, since ``os.replace`` cannot replace a
    non-empty folder; a crash in between leaves either folder whole, never a mix.
    """
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_tmp(parent: Path) -> int:
    """Removes the temporary files and folders an interrupted run left in ``parent`` (e.g. ``<root>/scenes``;
    missing is fine) and returns how many."""
    if not parent.is_dir():
        return 0
    removed = 0
    for entry in parent.iterdir():
        if TMP_MARK not in entry.name and not re.fullmatch(r"\..+\.old-\d+", entry.name):  # commit_dir's
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
