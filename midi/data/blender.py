"""``--renderer blender``: textured, path-traced views (Cycles) with exact id maps, through the bpy wheel.

The embree renderer (:mod:`midi.data.render`) draws flat instance colours; training images from
real scenes have textures, materials and lighting. This renderer hands a scene's source files to
Blender (its importers read GLB/glTF, OBJ + MTL, PLY and STL with their textures, materials and
vertex colours) and renders every view with Cycles: CPU, or CUDA/OptiX where available
(``device``), ``samples`` per pixel with denoising, a transparent film composited over the
background exactly (or kept as RGBA), a lighting preset (``sun_sky``) or an HDRI, and a second,
re-lit rendering per view (another sun, or the HDRI turned around) that becomes an extra view with
the same camera and id map (``relit_of`` in its record), as 3D-Front's ``render_``/``rerender_``.
The id map is Cycles' object-index pass, which is never anti-aliased; the cameras are the embree
renderer's (:func:`midi.data.camera.camera_record`), so both renderers' id maps agree but for
edge pixels.

bpy runs in its own process (:mod:`midi.data.blender_worker`), one per prepare worker, started on
its first scene and reused for the next ones: bpy 4.5 needs numpy < 2 (so it usually lives in its
own environment, see requirements-blender.txt), a Blender crash must not take the prepare worker
with it, and Blender's start-up (~1 s) is paid once. The interpreter is ``python`` of the
settings, else this one when it has bpy, else ``$MIDI_BLENDER_PYTHON``; without any, prepare
falls back to embree with a one-line note. A scene Blender cannot import is skipped with its
reason (:class:`~midi.errors.DataError`).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from midi.data.camera import camera_record
from midi.data.images import Colour
from midi.errors import DataError

WORKER = Path(__file__).with_name("blender_worker.py")
MARK = "@@MIDI@@ "  # the worker's reply prefix (its stdout also carries Blender's log)
ENV_PYTHON = "MIDI_BLENDER_PYTHON"
RENDERERS = ("embree", "blender")
BLENDER_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")
LOG_LINES = 20  # Blender log lines kept for the error message of a worker that died


@dataclass(frozen=True)
class BlenderSettings:
    """Settings of the Blender renderer (the command line's defaults)."""

    samples: int = 64  # Cycles samples per pixel (denoised)
    denoise: bool = True  # OpenImageDenoise on the CPU, OptiX's on NVIDIA GPUs
    device: str = "auto"  # auto (OptiX, else CUDA, else CPU), cpu, cuda, optix
    lighting: str = "sun_sky"  # the preset, or the path of an HDRI (.hdr/.exr) lighting the scene
    relight: bool = True  # also render every view re-lit, as an extra view
    transparent: bool = False  # keep the film transparent (RGBA views) instead of compositing the background
    python: str | None = None  # interpreter with bpy (None: this one if it has bpy, else $MIDI_BLENDER_PYTHON)
    threads: int = 1  # Cycles CPU threads per worker (the prepare workers are the parallelism)
    timeout: float = 1800.0  # seconds one scene may take before the Blender process is restarted


@dataclass
class BlenderObject:
    """What the worker imports for one object: a file (one node of it for scene files) and its id."""

    path: str  # absolute path of the source file
    node: str | None  # the node of a scene file whose meshes are this object, None for the whole file
    id: int  # object index + 1: the id map value
    bbox: list[list[float]]  # [[min xyz], [max xyz]] of trimesh's mesh in the normalised frame (checked)


def find_python(explicit: str | None = None) -> str | None:
    """The interpreter to run bpy in: ``explicit``, this one when it has bpy, else ``$MIDI_BLENDER_PYTHON``."""
    if explicit:
        return explicit
    if importlib.util.find_spec("bpy") is not None:
        return sys.executable
    return os.environ.get(ENV_PYTHON) or None


def unavailable_note(settings: BlenderSettings) -> str | None:
    """None when Blender can run, else the one-line note prepare prints before falling back to embree."""
    python = find_python(settings.python)
    if python is None:
        return ("note: --renderer blender: no bpy in this environment (install requirements-blender.txt, "
                f"see TRAINING_README.md, or set --blender_python / ${ENV_PYTHON}); rendering with embree")
    if not shutil.which(python) and not Path(python).is_file():
        return f"note: --blender_python {python}: not found; rendering with embree"
    if python == sys.executable:
        if importlib.util.find_spec("bpy") is None:
            return f"note: {python}: cannot import bpy (not installed); rendering with embree"
    else:  # another environment: does it have bpy? (one import, a few seconds)
        try:
            done = subprocess.run([python, "-c", "import bpy"], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"note: {python}: cannot run it ({type(exc).__name__}); rendering with embree"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"note: {python}: cannot import bpy ({last}); rendering with embree"
    return None


def scene_objects(kind: str, path: str | Path, sources: Sequence[str], bboxes: Sequence[np.ndarray]
                  ) -> list[BlenderObject]:
    """The source of every object of a scene (``sources``: their ``NamedMesh.source``), in id order.

    ``kind`` and ``path`` are the job's (a folder scene's files are in ``path``; a scene file's
    objects are its nodes, ``file#node``). Raises DataError for inputs Blender cannot read.
    """
    path = Path(path).resolve()
    out = []
    for index, (source, bbox) in enumerate(zip(sources, bboxes)):
        name, _, node = str(source).partition("#")
        file = path / name if kind == "folder" else path
        if file.suffix.lower() not in BLENDER_SUFFIXES:
            raise DataError(f"{file.name}: Blender cannot import {file.suffix} files (use --renderer embree)")
        out.append(BlenderObject(str(file), node if kind == "scene_file" else None, index + 1,
                                 np.asarray(bbox, np.float64).tolist()))
    return out


class BlenderProcess:
    """One bpy worker process, reused across scenes; restarted after a crash or a timeout."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Sends one request and waits for its reply (DataError when the process dies or times out)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self.close()
            raise DataError(f"the Blender process died ({self._last_log()})") from None
        reply: list[dict[str, Any]] = []
        reader = threading.Thread(target=self._read_reply, args=(reply,), daemon=True)
        reader.start()
        reader.join(timeout)
        if not reply:
            died = self.proc.poll() is not None
            self.close()
            what = "died" if died else f"took more than {timeout:.0f} s"
            raise DataError(f"the Blender process {what} ({self._last_log()})")
        return reply[0]

    def _start(self) -> None:
        # -P: the worker's folder stays off sys.path (no module here may shadow a Blender add-on).
        self.proc = subprocess.Popen([self.python, "-P", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)

    def _read_reply(self, reply: list[dict[str, Any]]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                reply.append(json.loads(line[len(MARK):]))
                return
            if line.strip():
                self.log.append(line.strip())

    def _last_log(self) -> str:
        return self.log[-1] if self.log else "no output"

    def close(self) -> None:
        """Ends the process (its stdin closing ends its loop; a hung one is killed)."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.proc = None


_PROCESSES: dict[str, BlenderProcess] = {}  # per interpreter, per prepare worker process


def _process(python: str) -> BlenderProcess:
    if python not in _PROCESSES:
        _PROCESSES[python] = BlenderProcess(python)
        if len(_PROCESSES) == 1:
            atexit.register(close_all)
    return _PROCESSES[python]


def close_all() -> None:
    """Ends this process's Blender workers (also run at exit)."""
    for process in _PROCESSES.values():
        process.close()
    _PROCESSES.clear()


@dataclass
class BlenderView:
    """One rendered camera: the image, its re-lit twin (or None) and the id map."""

    rgb: np.ndarray  # (H, W, 3) uint8, or (H, W, 4) with a transparent background
    relit: np.ndarray | None
    ids: np.ndarray  # (H, W) int32, 0 = background, k+1 = object k
    camera: dict[str, Any]  # the camera record
    seconds: float  # Blender's time for this view (both renderings)


def render_blender(objects: Sequence[BlenderObject], normalization: dict[str, Any], cameras: Sequence[Any],
                   radius: float, image_size: int, background: Colour, settings: BlenderSettings) -> list[BlenderView]:
    """Renders a scene from ``cameras`` (:class:`midi.data.camera.Camera`) with Blender.

    ``radius`` fits a camera without distance (as :func:`midi.data.render.render_scene` does).

    Raises:
        DataError: Blender is not available, cannot import a source, or failed on the scene.
    """
    python = find_python(settings.python)
    if python is None:
        raise DataError("--renderer blender: no bpy (see requirements-blender.txt)")
    records = [camera_record(c, radius, image_size, image_size) for c in cameras]
    with tempfile.TemporaryDirectory(prefix="midi-blender-") as out:
        req = asdict(settings) | {"objects": [asdict(o) for o in objects], "normalization": normalization,
                                  "cameras": records, "size": image_size, "out": out}
        reply = _process(python).request(req, settings.timeout)
        if not reply.get("ok"):
            raise DataError(f"Blender: {reply.get('reason', 'failed')}")
        views = []
        for view, record, seconds in zip(reply["views"], records, reply["seconds_per_view"]):
            relit = _image(view["relit"], background, settings.transparent) if view.get("relit") else None
            views.append(BlenderView(_image(view["rgb"], background, settings.transparent), relit,
                                     np.load(view["ids"]).astype(np.int32), record, float(seconds)))
        return views


def _image(path: str, background: Colour, transparent: bool) -> np.ndarray:
    rgba = np.asarray(Image.open(path).convert("RGBA"), np.float32) / 255.0
    if transparent:
        return np.rint(rgba * 255.0).astype(np.uint8)
    # Blender writes straight (unassociated) alpha: over the background with the alpha as weight.
    rgb = rgba[..., :3] * rgba[..., 3:] + np.asarray(background, np.float32) * (1.0 - rgba[..., 3:])
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
