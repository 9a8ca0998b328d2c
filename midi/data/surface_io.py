"""Reading and writing per-object surface samples.

Two file formats hold the same two arrays, ``surface_points`` (P, 3) float32 and
``surface_normals`` (P, 3) float32 unit vectors:

- ``.npy``: the MIDI format, a dict saved with :func:`numpy.save` (numpy pickles it);
- ``.npz``: the two arrays by name (no pickle at all).

Loading a pickle can run arbitrary code, so ``.npy`` files are read with a restricted unpickler
that can only rebuild numpy arrays, dtypes and plain containers (ndarray subclasses such as
trimesh's ``TrackedArray`` come back as plain arrays); anything else is refused, with a
one-line command to convert a trusted file.
A plain numeric ``.npy`` of shape (P, 6) (xyz + normals) is accepted too.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core import multiarray as _multiarray  # the home of _reconstruct in numpy 2
from numpy._core import numeric as _numeric

from midi.data.atomic import atomic_write
from midi.errors import DataError

SURFACE_KEYS = ("surface_points", "surface_normals")
SURFACE_SUFFIXES = (".npy", ".npz")

# (module, name) -> object. Both numpy 1 ("numpy.core") and numpy 2 ("numpy._core") spellings
# occur in files written by different numpy versions; _codecs.encode appears in protocol-2
# pickles for the raw array bytes, _frombuffer in protocol-5 ones. None of these can run code.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{core}.{sub}", name): getattr(module, name) for core in ("numpy.core", "numpy._core") for sub, module, name
       in (("multiarray", _multiarray, "_reconstruct"), ("multiarray", _multiarray, "scalar"),
           ("numeric", _numeric, "_frombuffer"))},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
    # ndarray subclasses: trimesh's sample_surface/face_normals return TrackedArray, so surfaces
    # saved by trimesh pipelines pickle its name. Rebuilding them as plain ndarrays keeps the
    # data and never imports or runs trimesh (or numpy.matrix) code.
    ("trimesh.caching", "TrackedArray"): np.ndarray, ("numpy", "matrix"): np.ndarray, ("numpy", "memmap"): np.ndarray,
}
# One line telling the user how to turn a refused (but trusted) file into a plain (P, 6) .npy.
_CONVERT = ("if you trust it, convert it with: python -c \"import numpy as np, sys; d = np.load(sys.argv[1], "
            "allow_pickle=True).item(); np.save(sys.argv[1], np.concatenate([np.asarray(d['surface_points']), "
            "np.asarray(d['surface_normals'])], 1))\" {path}")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves the numpy names needed to rebuild arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def save_surface(path: str | Path, points: np.ndarray, normals: np.ndarray) -> None:
    """Writes one object's (P, 3) points and unit normals atomically as ``.npy`` (MIDI dict) or ``.npz`` (by suffix).

    Raises:
        DataError: Bad shapes or suffix.
    """
    path = Path(path)
    pts, nrm = _validate_arrays(np.asarray(points), np.asarray(normals), path)
    if path.suffix not in SURFACE_SUFFIXES:
        raise DataError(f"{path.name}: surface files must end in .npy or .npz")
    with atomic_write(path) as f:
        if path.suffix == ".npz":
            np.savez(f, surface_points=pts, surface_normals=nrm)
        else:
            np.save(f, {"surface_points": pts, "surface_normals": nrm}, allow_pickle=True)


def load_surface(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one object's surface samples, ``(points, normals)`` (P, 3) float32, never running code from the file.

    ``path``: a ``.npy`` (dict saved by numpy, or a plain (P, 6) array) or ``.npz`` file.

    Raises:
        DataError: Missing or unreadable file, a pickle referencing anything but numpy arrays,
            missing keys or bad shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: surface file not found")
    try:
        data = _load_npz(path) if path.suffix == ".npz" else _load_npy(path)
    except DataError:
        raise
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused to unpickle ({exc}); only a dict of numpy arrays is allowed; "
                        + _CONVERT.format(path=path)) from exc
    except Exception as exc:
        raise DataError(f"{path}: cannot read surface file ({type(exc).__name__}: {exc})") from exc
    return _validate_arrays(data["surface_points"], data["surface_normals"], path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in SURFACE_KEYS if k not in archive.files]
        if missing:
            raise DataError(f"{path}: missing arrays {missing} (has {sorted(archive.files)})")
        return {k: archive[k] for k in SURFACE_KEYS}


def _load_npy(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in header:
            raise DataError(f"{path}: unsupported .npy version {version}")
        _, _, dtype = header[version](f)
        if not dtype.hasobject:
            return _split_plain_array(np.load(path, allow_pickle=False), path)
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
    return _dict_from_object(obj, path)


def _split_plain_array(array: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    if array.ndim != 2 or array.shape[1] != 6:
        raise DataError(f"{path}: a plain array must be (P, 6) xyz+normals, got {array.shape}")
    return {"surface_points": array[:, :3], "surface_normals": array[:, 3:]}


def _dict_from_object(obj: Any, path: Path) -> dict[str, np.ndarray]:
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        obj = obj.reshape(()).item()
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict of surface arrays, got {type(obj).__name__}")
    missing = [k for k in SURFACE_KEYS if k not in obj]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (has {sorted(map(str, obj))})")
    return {k: obj[k] for k in SURFACE_KEYS}


def _validate_arrays(points: Any, normals: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    for key, value in zip(SURFACE_KEYS, (points, normals)):
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise DataError(f"{path}: {key} is not a numeric array")
        if value.ndim != 2 or value.shape[1] != 3:
            raise DataError(f"{path}: {key} must be (P, 3), got {value.shape}")
    if points.shape != normals.shape:
        raise DataError(f"{path}: points {points.shape} and normals {normals.shape} differ in length")
    if len(points) == 0:
        raise DataError(f"{path}: no surface points")
    return points.astype(np.float32, copy=False), normals.astype(np.float32, copy=False)
