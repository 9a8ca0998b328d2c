"""Keeping BLAS single-threaded while the data tools run.

The tools get their parallelism from worker processes. OpenBLAS (bundled with numpy and scipy)
starts its own threads for large ``np.dot`` calls (trimesh uses them for normals and transforms)
and keeps them spinning afterwards; on a small machine those threads steal the cores the
workers need and halve their speed. This module finds the OpenBLAS libraries loaded in the
process and sets their thread count, restoring it afterwards. Where none is found (another BLAS,
another OS) it does nothing. The worker initializer also ties each worker's life to its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The symbol names differ between builds: numpy's 64-bit-int build, scipy's build, plain OpenBLAS.
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_GETTERS = tuple(name.replace("_set_", "_get_") for name in _SETTERS)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _loaded_openblas() -> list[ctypes.CDLL]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = sorted({line.split()[-1] for line in lines if "openblas" in line.lower() and "/" in line})
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _symbol(lib: ctypes.CDLL, names: tuple[str, ...]):
    for name in names:
        func = getattr(lib, name, None)
        if func is not None:
            return func
    return None


def set_blas_threads(count: int) -> list[tuple[ctypes.CDLL, int]]:
    """Sets the thread count of every loaded OpenBLAS.

    Args:
        count: Threads per library.

    Returns:
        ``(library, previous count)`` pairs, to restore with :func:`restore_blas_threads`.
    """
    previous = []
    for lib in _loaded_openblas():
        setter, getter = _symbol(lib, _SETTERS), _symbol(lib, _GETTERS)
        if setter is None or getter is None:
            continue
        previous.append((lib, int(getter())))
        setter(int(count))
    return previous


def restore_blas_threads(previous: list[tuple[ctypes.CDLL, int]]) -> None:
    """Restores the counts returned by :func:`set_blas_threads`."""
    for lib, count in previous:
        setter = _symbol(lib, _SETTERS)
        if setter is not None:
            setter(count)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Runs the block with every loaded OpenBLAS limited to one thread."""
    previous = set_blas_threads(1)
    try:
        yield
    finally:
        restore_blas_threads(previous)


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_init(parent: int | None = None) -> None:
    """ProcessPoolExecutor initializer: no BLAS threads, and exit when ``parent`` dies.

    A pool worker waiting on its queue never notices a ``kill -9`` of the parent: it would live
    on, or finish its scene and race a rerun. On Linux the kernel kills it (parent-death
    signal); elsewhere a thread watches for the parent to change.
    """
    set_blas_threads(1)
    if parent is None:
        return
    if sys.platform.startswith("linux") and ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
        # The parent may have died before prctl: then no signal comes. (With a forkserver the
        # parent process is the server, which exits with the parent.)
        if os.getppid() != parent and not pid_alive(parent):
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def _watch_parent(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(1)
