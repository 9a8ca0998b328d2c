"""The prepare pipeline: workers, resume, atomic scene writes, manifest and report.

A scene is written into ``scenes/<id>.tmp-<random>/`` and renamed to ``scenes/<id>/`` when
complete; its ``scene.json`` is written last, so a folder with ``scene.json`` is a finished scene
and is skipped on a re-run. The manifest is rewritten last, atomically, listing every finished
scene of the folder (also those of earlier runs). Scenes that fail are skipped with a one-line
reason in the report; nothing of them is left on disk.

``scene.json`` fields: ``format``, ``version``, ``id``; ``objects`` in id order, each with
``name``, ``surface`` (path in the scene folder), ``source`` (input file, ``file#node`` for scene
files), ``num_points``, and for meshes ``num_faces``, ``area`` (normalised units) and, when loading
repaired the mesh, ``warning``;
``views``, each with ``name``, ``image``, ``id_map``, ``instance_pixels`` (pixels per object),
``camera`` (for rendered views: orbit parameters, ``eye``, OpenCV ``intrinsics`` and
``world_to_camera``; null for user images), ``rendered`` and the source files of user views;
``normalization`` (``center``, ``scale``, ``bound``: normalised = (original - center) * scale);
``dropped`` (``name``, ``reason`` of objects left out); ``source`` (input kind and path);
``num_surface_points``, ``image_size``, ``surface_format``, ``background``, ``seed``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from midi.data import layout, sources
from midi.data.atomic import commit_dir, make_tmp_dir, remove_stale_tmp, write_json
from midi.data.images import labels_to_image, save_png
from midi.data.jobs import ObjectData, PrepareOptions, SceneContent, SceneJob, ViewData
from midi.data.manifest import SCENE_SETTINGS, check_resume_settings, settings, write_manifest
from midi.data.surface_io import save_surface
from midi.data.synthetic import synthetic_jobs
from midi.errors import DataError, UsageError

REPORT_NAME = "prepare_report.json"
LOCK_NAME = ".prepare.lock"
WORKER_DIED = "worker died (out of memory?)"
# Errors of the output disk: fatal for the whole run, since every later scene would fail alike.
FATAL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS) if e)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class SceneOutcome:
    """What happened to one scene: ``status`` is ``written``, ``done`` (finished earlier) or ``skipped``."""

    scene_id: str
    status: str
    reason: str = ""
    num_objects: int = 0
    seconds: float = 0.0
    warnings: list[dict[str, str]] = field(default_factory=list)


@dataclass
class PrepareReport:
    """Summary of a prepare run."""

    output_dir: str  # dataset root
    written: list[str] = field(default_factory=list)  # scenes written by this run
    already_done: list[str] = field(default_factory=list)  # scenes found finished (resume)
    skipped: list[dict[str, str]] = field(default_factory=list)  # ``{"scene", "reason"}`` of every scene that failed
    # ``{"scene", "object", "detail"}`` of every object dropped or repaired in a written scene
    warnings: list[dict[str, str]] = field(default_factory=list)
    num_meshes: int = 0  # objects written by this run
    seconds: float = 0.0  # wall time of the scene work
    workers: int = 1  # worker processes used
    num_scenes_total: int = 0  # scenes listed in the manifest
    aborted: bool = False  # true when ``strict`` stopped the run at the first failure
    shard: dict[str, int] | None = None  # ``{"index", "count"}`` of a sharded run's part (None: all scenes)

    @property
    def meshes_per_second(self) -> float:
        """Objects written per second of wall time."""
        return self.num_meshes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:  # as stored in prepare_report.json
        return asdict(self) | {"meshes_per_second": round(self.meshes_per_second, 3)}

    def summary(self) -> str:
        """A human-readable multi-line summary (one line per skipped scene)."""
        lines = [
            f"prepared {len(self.written)} scene(s) ({self.num_meshes} meshes, {self.meshes_per_second:.2f} meshes/s, "
            f"{self.workers} worker(s)); {len(self.already_done)} already done; {len(self.skipped)} skipped; "
            f"{len(self.warnings)} warning(s); {self.num_scenes_total} scene(s) in {self.output_dir}/{layout.MANIFEST}"
        ]
        if self.shard:
            lines[0] += f" (shard {self.shard['index']} of {self.shard['count']}: merge the parts with --merge)"
        lines += [f"  skipped {s['scene']}: {s['reason']}" for s in self.skipped]
        lines += [f"  warning {w['scene']}/{w['object']}: {w['detail']}" for w in self.warnings]
        if self.aborted:
            lines.append("  stopped at the first failure (--strict)")
        return "\n".join(lines)


def prepare_dataset(input_dir: str | Path, output_dir: str | Path, options: PrepareOptions | None = None,
                    workers: int = 1, progress: bool = False, strict: bool = False,
                    shard: tuple[int, int] | None = None) -> PrepareReport:
    """Prepares every scene found in ``input_dir`` into ``output_dir`` (resumable).

    ``input_dir`` holds scene folders and/or scene files, or is a single scene file or a 3D-Front
    root; ``workers=1`` works in this process; ``strict`` stops at the first skipped scene;
    ``shard`` = ``(index, count)`` prepares only the scenes of that shard (:func:`run_jobs`).

    Raises:
        DataError: The input does not exist or is already a prepared dataset.
        UsageError: ``output_dir`` was prepared with other settings.
    """
    output_dir, options = Path(output_dir), options or PrepareOptions()
    # An output folder inside the input folder must not be taken for a scene on a re-run.
    jobs = [j for j in sources.discover_jobs(Path(input_dir), options.single_object)
            if Path(j.path).resolve() != output_dir.resolve()]
    return run_jobs(output_dir, jobs, options, workers=workers, progress=progress, strict=strict, shard=shard)


def prepare_synthetic(output_dir: str | Path, num_scenes: int, *, seed: int = 0, options: PrepareOptions | None = None,
                      workers: int = 1, progress: bool = False, strict: bool = False,
                      domain: str = "base", shard: tuple[int, int] | None = None) -> PrepareReport:
    """Writes ``num_scenes`` seeded synthetic scenes straight into the prepared layout (resumable).

    Scene ``i`` (id ``synthetic_<i:05d>``) is drawn from ``scene_seed(seed, i)``; ``seed`` also
    seeds the sampling (it replaces ``options.seed``). ``domain``: ``base`` (primitives) or ``target``
    (furniture), see :data:`midi.data.shapes.DOMAINS`. The other arguments are those of
    :func:`prepare_dataset`.
    """
    options = dataclass_replace(options or PrepareOptions(), seed=seed)
    return run_jobs(Path(output_dir), synthetic_jobs(num_scenes, seed, domain=domain), options, workers=workers, progress=progress,
                    strict=strict, shard=shard)


def run_jobs(output_dir: Path, jobs: Sequence[SceneJob], options: PrepareOptions, workers: int = 1,
             progress: bool = False, strict: bool = False, shard: tuple[int, int] | None = None) -> PrepareReport:
    """Runs scene jobs (finished ones are skipped) on ``workers`` processes, then writes the manifest.

    With ``shard = (index, count)`` only the jobs whose scene id hashes to ``index``
    (:func:`midi.data.layout.shard_of`) run, and ``output_dir`` is that shard's part folder (its
    manifest records the shard; :func:`midi.data.shards.merge_parts` joins the parts). The
    other arguments are those of :func:`prepare_dataset`. The report is also written to
    ``<output_dir>/prepare_report.json``.

    Raises:
        UsageError: Another run (a live pid in ``<output_dir>/.prepare.lock``) writes there, or a bad shard.
    """
    output_dir = Path(output_dir)
    _validate_options(options)
    shard_json = None
    if shard is not None:
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise UsageError(f"--shard_index must be in [0, --num_shards) and --num_shards >= 1, got {index} of {count}")
        # The ids come from the whole input (unique_names), so every shard names scenes alike.
        jobs = [j for j in jobs if layout.shard_of(j.scene_id, count) == index]
        shard_json = {"index": index, "count": count}
    (output_dir / layout.SCENES_DIR).mkdir(parents=True, exist_ok=True)
    with output_lock(output_dir):
        check_resume_settings(output_dir, options, shard_json)
        remove_stale_tmp(output_dir / layout.SCENES_DIR)
        finished = {j.scene_id for j in jobs if layout.is_finished(layout.scene_dir(output_dir, j.scene_id))}
        report = PrepareReport(str(output_dir), already_done=[j.scene_id for j in jobs if j.scene_id in finished],
                               workers=max(1, workers), shard=shard_json)
        pending = [j for j in jobs if j.scene_id not in finished]
        start = time.perf_counter()
        # The parallelism comes from the workers: BLAS threads (trimesh's np.dot) would only steal their cores.
        bar = tqdm(total=len(jobs), initial=len(report.already_done), disable=not progress, unit="scene")
        with threadpool_limits(1), bar:
            for outcome in _outcomes(output_dir, pending, options, workers):
                _record(report, outcome)
                bar.update(1)
                bar.set_postfix(meshes=report.num_meshes, skipped=len(report.skipped))
                if strict and outcome.status == "skipped":
                    report.aborted = True
                    break
        report.seconds = time.perf_counter() - start
        report.num_scenes_total = len(write_manifest(output_dir, options, shard_json)["scenes"])
        write_json(output_dir / REPORT_NAME, report.to_json())
        return report


@contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Holds ``<output_dir>/.prepare.lock`` (this pid) while a run writes there.

    Two runs (or a rerun and the workers of a killed run) would race on the same scenes and
    remove each other's temporary folders. A lock whose pid is dead (or unreadable) is stale
    and taken over.

    Raises:
        UsageError: The lock is held by a live process (named by its pid).
    """
    path = output_dir / LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
                raise UsageError(f"{path}: another prepare run (pid {pid}) is writing into {output_dir}; "
                                 "wait for it, or delete the lock if no such run is going on") from None
            path.unlink(missing_ok=True)
    else:
        raise UsageError(f"{path}: cannot take the lock (other runs keep taking it)")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _validate_options(o: PrepareOptions) -> None:
    checks = (  # (valid, message), checked in order
        (o.surface_format in ("npy", "npz"), f"surface format must be npy or npz, got {o.surface_format!r}"),
        (o.num_samples >= 1 and o.image_size >= 8 and o.views >= 1,
         "num_samples must be >= 1, image_size >= 8 and views >= 1"),
        (0.0 < o.bound <= 1.0, f"margin must leave a bound in (0, 1], got bound {o.bound}"),
        (o.render in ("auto", "always", "never"), f"render must be auto, always or never, got {o.render!r}"),
    )
    problem = next((message for valid, message in checks if not valid), None)
    if problem:
        raise UsageError(problem)


def _record(report: PrepareReport, outcome: SceneOutcome) -> None:
    if outcome.status == "written":
        report.written.append(outcome.scene_id)
        report.num_meshes += outcome.num_objects
        report.warnings += [{"scene": outcome.scene_id} | w for w in outcome.warnings]
    elif outcome.status == "done":
        report.already_done.append(outcome.scene_id)
    else:
        report.skipped.append({"scene": outcome.scene_id, "reason": outcome.reason})


def _outcomes(output_dir: Path, jobs: Sequence[SceneJob], options: PrepareOptions, workers: int):
    """Yields one outcome per job as they finish (in this process when workers <= 1)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield process_job(job, output_dir, options)
        return
    pool = _pool(workers)
    try:
        # Keep only a few jobs queued per worker, so a --strict stop or Ctrl-C leaves little to cancel.
        queue = list(reversed(jobs))
        running: dict[Future[SceneOutcome], SceneJob] = {}
        while queue or running:
            while queue and len(running) < 2 * workers:
                job = queue.pop()
                running[pool.submit(process_job, job, output_dir, options)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                job = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    # A worker was killed (typically by the OOM killer): which job did it is
                    # unknown, so every job in flight is skipped; the rest go to a new pool.
                    broken = True
                    yield SceneOutcome(job.scene_id, "skipped", WORKER_DIED)
            if broken:
                for job in running.values():
                    yield SceneOutcome(job.scene_id, "skipped", WORKER_DIED)
                running.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _pool(workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int) -> ProcessPoolExecutor:
    # Workers get this pid so that they die with this process (see worker_init).
    return ProcessPoolExecutor(max_workers=workers, initializer=worker_init, initargs=(os.getpid(),))


def worker_init(parent: int) -> None:
    """ProcessPoolExecutor initializer: single-threaded BLAS, and exit when ``parent`` dies.

    A pool worker waiting on its queue never notices a ``kill -9`` of the parent: it would live
    on, or finish its scene and race a rerun. On Linux the kernel kills it (parent-death
    signal); elsewhere a thread watches for the parent to change.
    """
    threadpool_limits(1)  # kept for the worker's life (never restored)
    if sys.platform.startswith("linux") and ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
        # The parent may have died before prctl: then no signal comes. (With a forkserver the
        # parent process is the server, which exits with the parent.)
        if os.getppid() != parent and not psutil.pid_exists(parent):
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def _watch_parent(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(1)


def process_job(job: SceneJob, output_dir: Path, options: PrepareOptions) -> SceneOutcome:
    """Builds and writes one scene; never raises for bad input (worker entry point).

    Returns ``written`` with the object count, ``done`` if finished earlier, or ``skipped`` with a one-line reason.
    """
    start = time.perf_counter()
    if layout.is_finished(layout.scene_dir(output_dir, job.scene_id)):
        return SceneOutcome(job.scene_id, "done")
    try:
        with threadpool_limits(1):  # again per job: libraries loaded since the worker started
            content = sources.build_content(job, options)
            write_scene(output_dir, job.scene_id, content, options)
    except DataError as exc:
        return SceneOutcome(job.scene_id, "skipped", str(exc))
    except Exception as exc:  # a per-scene failure must never stop the run...
        if isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS:
            raise  # ...but a full or read-only output disk does (prepare_data.py prints one line)
        return SceneOutcome(job.scene_id, "skipped", str(DataError(f"{type(exc).__name__}: {exc}")))
    # Objects left out or repaired are not failures, but must not pass unseen ("clean").
    warnings = [{"object": d["name"], "detail": f"dropped: {d['reason']}"} for d in content.dropped]
    warnings += [{"object": o.name, "detail": o.info["warning"]} for o in content.objects if o.info.get("warning")]
    return SceneOutcome(job.scene_id, "written", num_objects=len(content.objects),
                        seconds=time.perf_counter() - start, warnings=warnings)


def write_scene(output_dir: Path, scene_id: str, content: SceneContent, options: PrepareOptions) -> Path:
    """Writes one scene into a temporary folder and renames it into place; returns the final folder."""
    tmp = make_tmp_dir(Path(output_dir) / layout.SCENES_DIR, scene_id)
    try:
        (tmp / layout.SURFACES_DIR).mkdir()
        (tmp / layout.VIEWS_DIR).mkdir()
        objects = [_write_object(tmp, obj, options.surface_format) for obj in content.objects]
        views = [_write_view(tmp, k, view) for k, view in enumerate(content.views)]
        record = {"format": layout.FORMAT, "version": layout.VERSION, "id": scene_id, "objects": objects,
                  "views": views, "normalization": content.normalization, "dropped": content.dropped,
                  "source": content.source} | {k: v for k, v in settings(options).items() if k in SCENE_SETTINGS}
        write_json(tmp / layout.SCENE_JSON, record)
        commit_dir(tmp, final := layout.scene_dir(output_dir, scene_id))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_object(scene: Path, obj: ObjectData, surface_format: str) -> dict[str, Any]:
    path = layout.surface_path(scene, obj.name, surface_format)
    save_surface(path, obj.points, obj.normals)
    return {"name": obj.name, "surface": f"{layout.SURFACES_DIR}/{path.name}", "source": obj.source,
            "num_points": int(len(obj.points))} | obj.info


def _write_view(scene: Path, index: int, view: ViewData) -> dict[str, Any]:
    name = layout.view_name(index)
    image_path, ids_path = layout.view_paths(scene, name)
    save_png(image_path, Image.fromarray(view.rgb))
    save_png(ids_path, labels_to_image(view.ids))
    counts = np.bincount(view.ids.ravel()).tolist()  # [background, object 0, object 1, ...]
    return {"name": name, "image": f"{layout.VIEWS_DIR}/{image_path.name}",
            "id_map": f"{layout.VIEWS_DIR}/{ids_path.name}", "instance_pixels": counts[1:],
            "camera": view.camera} | view.source

