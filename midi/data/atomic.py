"""Atomic file and folder writes: an interrupted run never leaves a half-written file or scene.

Files are written to ``<name>.tmp-<pid>`` and renamed with :func:`os.replace` (atomic on POSIX and
Windows within one file system). A scene is assembled in ``scenes/<id>.tmp-<random>/`` and the
whole folder is renamed to ``scenes/<id>/`` once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from midi.data.layout import TMP_MARK


def tmp_path_for(path: Path) -> Path:
    """Returns the temporary sibling name used while ``path`` is written."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temporary sibling of ``path`` for writing and renames it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched; an OSError
    that names no file (``ENOSPC`` from ``write``) is re-raised naming ``path``.

    Args:
        path: Final file path.
        mode: ``open`` mode, ``"wb"`` or ``"w"`` (text is written as UTF-8).

    Yields:
        The open file object.
    """
    final = Path(path)
    tmp = tmp_path_for(final)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
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


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Writes ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes UTF-8 text, atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def save_safetensors(path: str | os.PathLike[str], tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (tensors are made contiguous)."""
    from safetensors.torch import save  # lazy: the data tools do not import torch

    payload = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(payload)


def make_tmp_dir(parent: Path, name: str) -> Path:
    """Creates an empty temporary folder ``<parent>/<name>.tmp-<random>``."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}{TMP_MARK}", dir=parent))


def commit_dir(tmp: Path, final: Path) -> None:
    """Renames a finished temporary folder onto its final name.

    A leftover folder at ``final`` (one without ``scene.json``, from a run that crashed in an
    older version or was edited by hand) is removed first, since ``os.replace`` cannot replace a
    non-empty folder.

    Args:
        tmp: The complete temporary folder.
        final: The final folder path.
    """
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_stale_tmp(parent: Path) -> int:
    """Removes temporary files and folders left in ``parent`` by an interrupted run.

    Args:
        parent: A folder (e.g. ``<root>/scenes``); missing is fine.

    Returns:
        How many entries were removed.
    """
    if not parent.is_dir():
        return 0
    removed = 0
    for entry in parent.iterdir():
        if TMP_MARK not in entry.name:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
