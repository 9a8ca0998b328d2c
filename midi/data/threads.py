"""Keeping BLAS single-threaded while the data tools run.

The tools get their parallelism from worker processes. OpenBLAS (bundled with numpy and scipy)
starts its own threads for large ``np.dot`` calls (trimesh uses them for normals and transforms)
and keeps them spinning afterwards; on a small machine those threads steal the cores the
workers need and halve their speed. This module finds the OpenBLAS libraries loaded in the
process and sets their thread count, restoring it afterwards. Where none is found (another BLAS,
another OS) it does nothing.
"""

from __future__ import annotations

import ctypes
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


def worker_init() -> None:
    """ProcessPoolExecutor initializer: workers never need BLAS threads."""
    set_blas_threads(1)
