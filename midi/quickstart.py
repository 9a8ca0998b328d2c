"""The logic behind ``quickstart_lora_training.sh``: environment report, data detection, memory
planning and writing the run's files.

The shell script keeps the prompts and the flow; every decision lives here, as typed functions
with a thin command line on top::

    python -m midi.quickstart doctor                       # Python, dependencies, torch/CUDA, RAM, disk
    python -m midi.quickstart deps                         # exit 1 when a pinned dependency is missing
    python -m midi.quickstart default-model
    python -m midi.quickstart check-model tiny             # or a pipeline folder with model_index.json
    python -m midi.quickstart run-name --runs-dir runs --model tiny [--name NAME]
    python -m midi.quickstart detect-data data/scenes
    python -m midi.quickstart write-accelerate --gpus 2 --out runs/x/accelerate.yaml
    python -m midi.quickstart write-config --base configs/train/tiny.yaml --out runs/x/config.yaml \\
        --model tiny --data-root runs/x/data --output-dir runs/x [--max-steps 2] [--batch-size 2] ...
    python -m midi.quickstart plan --config runs/x/config.yaml --budget-gb 24 --gpus 1 --write
    python -m midi.quickstart command --config runs/x/config.yaml --gpus 1 --python .venv/bin/python \\
        --accelerate-config runs/x/accelerate.yaml [--script runs/x/train.sh]

Conventions: human-readable text goes to stderr; values the script needs back are printed on stdout
as ``key=value`` lines (or a single value). Exit codes: 0 ok, 1 a check failed, 2 bad input
(one ``error:`` line per problem), 3 ``plan`` found no setting within the budget, 130 interrupted.
Importing this module needs only the standard library (it runs before the venv exists); PyYAML,
torch and ``midi.config`` are imported by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = "train_lora.py"
TINY_MODEL = "tiny"  # = midi.config.TINY_MODEL (a test checks)
REAL_MODEL_DIR = "pretrained_weights/MIDI-3D"
DOWNLOAD_HINT = "hf download VAST-AI/MIDI-3D --local-dir pretrained_weights/MIDI-3D"
TINY_CONFIG = "configs/train/tiny.yaml"
REAL_CONFIG = "configs/train/lora_finetune.yaml"
# Raw mesh formats prepare_data.py reads (= midi.data.meshes.MESH_SUFFIXES, a test checks; importing
# that module would pull in trimesh).
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
MIN_PYTHON = (3, 10)
TESTED_PYTHON = (3, 11)  # requirements.txt is pinned for 3.10-3.11
MIN_DISK_GB_REAL = 20.0  # weights (~10 GB) + checkpoints + a cache
MIN_DISK_GB_TINY = 1.0
HEADROOM = 0.10  # a setting fits when its measured peak is <= (1 - HEADROOM) x budget
CPU_BUDGET_FRACTION = 0.8  # default CPU budget: this fraction of the available RAM
OPTIONAL_PACKAGES = ("pytest", "pexpect", "ruff")  # test/lint tools: missing = warning only
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_FIT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class QuickstartError(Exception):
    """Bad input or a failed step; the message says what to do (printed as ``error: ...``)."""


def info(message: str = "") -> None:
    """A line for the person at the terminal (stderr, so stdout stays machine-readable)."""
    print(message, file=sys.stderr, flush=True)


def emit(**values: Any) -> None:
    """``key=value`` lines on stdout for the shell script (booleans as 1/0, None as empty)."""
    for key, value in values.items():
        text = "" if value is None else str(int(value)) if isinstance(value, bool) else str(value)
        print(f"{key}={text}", flush=True)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """Writes ``text`` to a hidden temporary sibling, flushes it to disk, then renames it onto ``path``.

    An interrupted write leaves ``path`` as it was (the temporary file is removed).

    Returns:
        The final path.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def display_path(path: str | os.PathLike[str], root: Path = REPO_ROOT) -> str:
    """``path`` relative to the repository when it lies inside it, else absolute."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------- doctor
@dataclass
class GpuInfo:
    """One visible CUDA device."""

    index: int
    name: str
    memory_gib: float


@dataclass
class Hardware:
    """What torch sees, plus RAM; ``torch_error`` is set when torch cannot be imported."""

    torch_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    ram_total_gib: float = 0.0
    ram_available_gib: float = 0.0
    torch_error: str | None = None

    @property
    def gpu_memory_gib(self) -> float:
        """Memory of the smallest visible GPU (each DDP process holds a full copy), 0 without GPUs."""
        return min((g.memory_gib for g in self.gpus), default=0.0)

    @property
    def cpu_budget_gib(self) -> float:
        """Default memory budget for CPU training: a fraction of the available RAM."""
        return round(max(1.0, self.ram_available_gib * CPU_BUDGET_FRACTION), 1)

    def default_budget_gib(self, gpus: int) -> float:
        """The memory question's default: GPU memory with ``gpus`` > 0, else the CPU budget."""
        return round(self.gpu_memory_gib, 1) if gpus > 0 and self.gpus else self.cpu_budget_gib


def read_meminfo(path: str = "/proc/meminfo") -> tuple[float, float]:
    """``(total, available)`` RAM in GiB (Linux /proc/meminfo; sysconf elsewhere; 0 when unknown)."""
    values: dict[str, float] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * 1024 / 2**30  # kB
    except OSError:
        pass
    total = values.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            total = 0.0
    return total, values.get("MemAvailable", total)


def detect_hardware() -> Hardware:
    """Torch version, CUDA devices and RAM (imports torch, ~3 s; never raises)."""
    hw = Hardware()
    hw.ram_total_gib, hw.ram_available_gib = read_meminfo()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        hw.torch_error = f"{type(exc).__name__}: {exc}"
        return hw
    hw.torch_version = torch.__version__
    hw.cuda_version = torch.version.cuda
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                hw.gpus.append(GpuInfo(i, props.name, props.total_memory / 2**30))
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the report
        hw.torch_error = f"CUDA query failed: {exc}"
    return hw


@dataclass
class DependencyStatus:
    """One pinned requirement and what is installed."""

    name: str
    wanted: str
    installed: str | None
    optional: bool

    @property
    def ok(self) -> bool:
        return self.installed is not None and _same_version(self.installed, self.wanted)


def _same_version(installed: str, wanted: str) -> bool:
    """``2.13.0+cu121`` satisfies ``==2.13.0`` (a local build label, as pip treats it)."""
    return installed.split("+", 1)[0] == wanted.split("+", 1)[0]


def read_requirements(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(name, version)`` of every ``name==version`` line of a requirements file."""
    pins = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if match:
            pins.append((match.group(1), match.group(2)))
    return pins


def check_dependencies(requirements: str | os.PathLike[str]) -> list[DependencyStatus]:
    """Installed version of each pinned requirement (None = not installed)."""
    status = []
    for name, wanted in read_requirements(requirements):
        try:
            installed: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        status.append(DependencyStatus(name, wanted, installed, name.lower() in OPTIONAL_PACKAGES))
    return status


def missing_required(status: Sequence[DependencyStatus]) -> list[DependencyStatus]:
    """The required (non-optional) packages that are not installed."""
    return [s for s in status if s.installed is None and not s.optional]


def disk_free_gib(path: str | os.PathLike[str]) -> float:
    """Free space of the file system holding ``path`` (its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 2**30


def doctor(requirements: Path, disk_path: Path, hw: Hardware | None = None) -> tuple[bool, dict[str, Any]]:
    """Prints the environment report (stderr) and returns ``(ok, values)``.

    ``ok`` is False when Python is too old or a required dependency is missing; GPUs, RAM and disk
    only produce warnings. ``values`` are what the wizard needs: detected GPUs, default budgets...
    """
    ok = True
    version = sys.version_info[:3]
    py = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        ok = False
        info(f"  [FAIL] Python {py} at {sys.executable}: needs >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}")
    elif version[:2] > TESTED_PYTHON:
        info(f"  [warn] Python {py}: requirements.txt is pinned for 3.10-3.11; newer versions may lack wheels")
    else:
        info(f"  [ ok ] Python {py} ({sys.executable})")
    deps = check_dependencies(requirements)
    missing = missing_required(deps)
    other = [s for s in deps if not s.ok and s not in missing]
    if missing:
        ok = False
        names = ", ".join(s.name for s in missing)
        info(f"  [FAIL] missing packages: {names}  (fix: {shlex.quote(sys.executable)} -m pip install -r "
             f"{display_path(requirements)})")  # fmt: skip
    else:
        info(f"  [ ok ] {len(deps) - len(other)}/{len(deps)} pinned packages installed at their versions")
    for s in other:
        got = "not installed" if s.installed is None else s.installed
        info(f"  [warn] {s.name}: {got}, requirements.txt pins {s.wanted}")
    hw = hw or detect_hardware()
    if hw.torch_error and hw.torch_version is None:
        info(f"  [FAIL] torch does not import: {hw.torch_error}")
        ok = False
    else:
        cuda = f"CUDA {hw.cuda_version}" if hw.cuda_version else "CPU-only build"
        info(f"  [ ok ] torch {hw.torch_version} ({cuda})")
        if hw.torch_error:
            info(f"  [warn] {hw.torch_error}")
    if hw.gpus:
        for g in hw.gpus:
            info(f"  [ ok ] GPU {g.index}: {g.name}, {g.memory_gib:.1f} GiB")
    elif shutil.which("nvidia-smi"):
        info("  [warn] nvidia-smi is installed but torch sees no GPU: torch is a CPU-only build or the driver is "
             "too old; install a CUDA build of torch (see README.md), then re-run")  # fmt: skip
    else:
        info("  [info] no CUDA GPU visible: training runs on the CPU (fine for the tiny demo; the real "
             "model wants a GPU with >= 24 GB)")  # fmt: skip
    info(f"  [info] RAM: {hw.ram_total_gib:.1f} GiB total, {hw.ram_available_gib:.1f} GiB available")
    free = disk_free_gib(disk_path)
    tag = "[ ok ]" if free >= MIN_DISK_GB_REAL else "[warn]"
    note = "" if free >= MIN_DISK_GB_REAL else (
        f": enough for the tiny demo (>= {MIN_DISK_GB_TINY:g} GB), too little for real training"
        if free >= MIN_DISK_GB_TINY else ": too little even for the tiny demo")  # fmt: skip
    info(f"  {tag} disk: {free:.1f} GiB free at {display_path(disk_path)}{note} (real training wants "
         f">= {MIN_DISK_GB_REAL:g} GB)")  # fmt: skip
    values = dict(python_version=py, python_ok=version[:2] >= MIN_PYTHON, deps_ok=not missing,
                  torch=hw.torch_version, cuda=hw.cuda_version, gpus=len(hw.gpus),
                  gpu_memory_gb=round(hw.gpu_memory_gib, 1), ram_gb=round(hw.ram_total_gib, 1),
                  cpu_budget_gb=hw.cpu_budget_gib, disk_free_gb=round(free, 1))  # fmt: skip
    return ok, values


# ----------------------------------------------------------------------------- model
@dataclass
class ModelChoice:
    """A validated base model and the training config the run starts from."""

    model: str  # "tiny" or a folder (as the config will hold it)
    base_config: str
    tiny: bool


def default_model(root: Path = REPO_ROOT) -> str:
    """``pretrained_weights/MIDI-3D`` when it holds a pipeline, else ``tiny``."""
    return REAL_MODEL_DIR if (root / REAL_MODEL_DIR / "model_index.json").is_file() else TINY_MODEL


def check_model(value: str, root: Path = REPO_ROOT) -> ModelChoice:
    """Validates the model answer: ``tiny`` or a folder holding ``model_index.json``.

    Raises:
        QuickstartError: not a folder, or no ``model_index.json`` in it (says how to download).
    """
    value = value.strip()
    if value.lower() == TINY_MODEL:
        return ModelChoice(TINY_MODEL, TINY_CONFIG, True)
    if not value:
        raise QuickstartError("empty answer: give a MIDI-3D pipeline folder or 'tiny'")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = root / path
    how = f"download the weights with `{DOWNLOAD_HINT}`, or answer 'tiny' for the embedded demo model"
    if not path.is_dir():
        raise QuickstartError(f"{value}: no such folder; {how}")
    if not (path / "model_index.json").is_file():
        raise QuickstartError(f"{value}: no model_index.json, so not a MIDI-3D pipeline folder; {how}")
    return ModelChoice(display_path(path, root), REAL_CONFIG, False)


# ----------------------------------------------------------------------------- run name
def suggest_run_name(runs_dir: Path, model: str) -> str:
    """``tiny-lora`` / ``midi-lora``, with ``-2``, ``-3``... when that run folder exists."""
    stem = "tiny-lora" if model == TINY_MODEL else "midi-lora"
    name, k = stem, 2
    while (runs_dir / name).exists():
        name, k = f"{stem}-{k}", k + 1
    return name


def check_run_name(name: str, runs_dir: Path) -> str:
    """Validates a run name (letters, digits, ``._-``) whose folder does not exist yet.

    Raises:
        QuickstartError: bad characters, or ``runs_dir/name`` exists.
    """
    if not _NAME.match(name):
        raise QuickstartError(f"{name!r}: a run name is 1-64 letters, digits, '.', '_' or '-' (starting with "
                              "a letter or digit)")  # fmt: skip
    if (runs_dir / name).exists():
        raise QuickstartError(f"{display_path(runs_dir / name)} already exists; choose another name (resume that "
                              f"run with `bash {display_path(runs_dir / name / 'train.sh')} "
                              "--resume_from_checkpoint latest`)")  # fmt: skip
    return name


# ----------------------------------------------------------------------------- data
@dataclass
class DataInfo:
    """What a data folder holds.

    ``kind``: ``prepared`` (manifest.json), ``3d-front``, ``raw`` (meshes to prepare), ``partial`` (an
    interrupted prepare_data.py output: scenes but no manifest yet), ``empty``, ``unknown``,
    ``missing`` or ``not-a-folder``.
    """

    kind: str
    path: Path
    message: str
    scenes: int = 0
    prepared_dir: Path | None = None


def prepared_dir_for(raw: Path) -> Path:
    """Where raw meshes get prepared: ``<folder>_prepared`` next to the folder."""
    raw = Path(os.path.abspath(raw))
    return raw.with_name(f"{raw.name}_prepared")


def _is_mesh(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(MESH_SUFFIXES) and entry.is_file()


def count_raw_scenes(root: Path, limit: int = 100_000) -> tuple[int, int]:
    """``(scene folders holding mesh files, top-level mesh files)``; stops counting at ``limit``."""
    folders = files = 0
    with os.scandir(root) as entries:
        for entry in entries:
            if folders + files >= limit:
                break
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                try:
                    with os.scandir(entry.path) as inner:
                        folders += any(_is_mesh(e) for e in inner)
                except OSError:
                    continue
            elif _is_mesh(entry):
                files += 1
    return folders, files


def detect_data(path: str | os.PathLike[str]) -> DataInfo:
    """Detects what a data folder holds (see :class:`DataInfo`); never raises for bad folders."""
    from midi.data import layout

    root = Path(path).expanduser()
    if not root.exists():
        return DataInfo("missing", root, f"{root}: no such folder")
    if not root.is_dir():
        return DataInfo("not-a-folder", root, f"{root}: not a folder")
    kind = layout.detect_layout(root)
    if kind == layout.FORMAT:
        scenes, val = _manifest_counts(root)
        message = f"{root}: a prepared dataset ({scenes} scenes in manifest.json, {val} in the val split)"
        if scenes and not val:
            message += ("; warning: training validates on the val split, so re-run prepare_data.py with "
                        "--val_fraction 0.1 (or set data.val_split in the config)")  # fmt: skip
        return DataInfo("prepared", root, message, scenes)
    if kind is not None:
        return DataInfo(kind, root, f"{root}: a 3D-Front root (used in place)")
    if _has_prepared_scenes(root / layout.SCENES_DIR, layout.SCENE_JSON, layout.TMP_MARK):
        return DataInfo("partial", root, f"{root}: scenes/ without manifest.json, an unfinished prepare_data.py "
                        "output; run prepare_data.py again on its raw folder to finish it")  # fmt: skip
    folders, files = count_raw_scenes(root)
    if folders or files:
        what = ", ".join(x for x in (f"{folders} scene folder(s) with meshes" if folders else "",
                                     f"{files} scene file(s)" if files else "") if x)  # fmt: skip
        target = prepared_dir_for(root)
        return DataInfo("raw", root, f"{root}: raw meshes ({what}); prepare_data.py turns them into training "
                        f"data in {target}", folders + files, target)  # fmt: skip
    if not any(root.iterdir()):
        return DataInfo("empty", root, f"{root}: empty folder")
    return DataInfo("unknown", root, f"{root}: no manifest.json, no 3D-Front layout and no mesh files "
                    f"({', '.join(MESH_SUFFIXES)}) in its subfolders")  # fmt: skip


def _has_prepared_scenes(scenes_dir: Path, scene_json: str, tmp_mark: str) -> bool:
    """True when ``scenes_dir`` holds a finished (``scene.json``) or in-progress (``.tmp-``) scene."""
    if not scenes_dir.is_dir():
        return False
    with os.scandir(scenes_dir) as entries:
        for entry in entries:
            if entry.is_dir() and (tmp_mark in entry.name or os.path.isfile(os.path.join(entry.path, scene_json))):
                return True
    return False


def _manifest_counts(root: Path) -> tuple[int, int]:
    """``(scenes, val scenes)`` listed in ``manifest.json`` (0, 0 when unreadable)."""
    import json

    try:
        data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        return len(data.get("scenes", [])), len(data.get("splits", {}).get("val", []))
    except (OSError, ValueError, AttributeError):
        return 0, 0


# ----------------------------------------------------------------------------- accelerate
def accelerate_config(gpus: int, visible_gpus: int | None = None) -> dict[str, Any]:
    """An ``accelerate launch`` config for one machine (keys as configs/accelerate/*.yaml).

    Args:
        gpus: 0 = CPU, 1 = one GPU, N >= 2 = DDP over N GPUs.
        visible_gpus: GPUs on the machine (None = unknown); with fewer used, ``gpu_ids`` names them.

    Precision stays ``no`` here: ``train.mixed_precision`` of the training config decides it.
    """
    if gpus < 0:
        raise QuickstartError(f"GPU count must be >= 0, got {gpus}")
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if gpus >= 2 else "NO",
        "num_machines": 1,
        "num_processes": max(1, gpus),
        "machine_rank": 0,
    }
    if gpus >= 2:
        cfg["gpu_ids"] = "all" if visible_gpus in (None, gpus) else ",".join(str(i) for i in range(gpus))
        cfg["rdzv_backend"] = "static"
        cfg["same_network"] = True
    elif gpus == 1:
        cfg["gpu_ids"] = "0"
    cfg.update({"mixed_precision": "no", "use_cpu": gpus == 0, "debug": False, "downcast_bf16": "no",
                "main_training_function": "main"})  # fmt: skip
    return cfg


def write_accelerate_config(path: str | os.PathLike[str], gpus: int, visible_gpus: int | None = None) -> Path:
    """Writes :func:`accelerate_config` as YAML (atomically), with a comment saying what it is."""
    import yaml

    what = {0: "CPU, one process", 1: "one GPU, one process"}.get(gpus, f"DDP over {gpus} GPUs of this machine")
    header = (f"# accelerate config written by quickstart_lora_training.sh: {what}.\n"
              "# Precision comes from train.mixed_precision in the training config, not from this file.\n")  # fmt: skip
    text = header + yaml.safe_dump(accelerate_config(gpus, visible_gpus), sort_keys=False)
    return atomic_write_text(path, text)


# ----------------------------------------------------------------------------- run config
@dataclass
class RunSettings:
    """The wizard's answers that go into the training config (None = keep the base config's value)."""

    model: str | None = None
    data_root: str | None = None
    output_dir: str | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    rank: int | None = None
    gradient_checkpointing: bool | None = None


def build_run_config(base: str | os.PathLike[str], settings: RunSettings, check_paths: bool = True):
    """Loads ``base`` and applies the answers; ``lora.alpha`` keeps the base's alpha / rank ratio.

    Returns:
        The validated :class:`midi.config.TrainingConfig`.

    Raises:
        midi.config.ConfigError: every problem (ranges, and with ``check_paths`` missing folders).
    """
    from midi.config import ConfigError, check_environment, load_config, validate

    cfg = load_config(base)
    s = settings
    if s.model is not None:
        cfg.model.pretrained_model_name_or_path = s.model
    if s.data_root is not None:
        cfg.data.root = s.data_root
        cfg.data.synthetic_if_missing = 0  # the wizard makes the data itself; a missing root is an error
    if s.output_dir is not None:
        cfg.train.output_dir = s.output_dir
    if s.max_steps is not None:
        cfg.train.max_steps = s.max_steps
    if s.batch_size is not None:
        cfg.train.batch_size = s.batch_size
    if s.rank is not None:
        ratio = cfg.lora.alpha / cfg.lora.rank if cfg.lora.rank > 0 else 1.0
        cfg.lora.rank, cfg.lora.alpha = s.rank, float(s.rank * ratio)
    if s.gradient_checkpointing is not None:
        cfg.model.gradient_checkpointing = s.gradient_checkpointing
    problems = validate(cfg) + (check_environment(cfg) if check_paths else [])
    if problems:
        raise ConfigError(problems, str(base))
    return cfg


def write_run_config(cfg, path: str | os.PathLike[str], note: str = "") -> Path:
    """Writes a validated config as commented YAML, atomically, after checking it reads back the same.

    Raises:
        QuickstartError: the YAML would not load back to the same config (nothing is written).
    """
    from midi.config import config_to_dict, config_to_yaml, load_config

    final = Path(path)
    header = "# Training config written by quickstart_lora_training.sh" + (f" ({note})" if note else "") + ".\n"
    header += "# Every key carries its doc; TRAINING_README.md explains them. Check it: train_lora.py --config THIS --dry_run\n"
    text = header + config_to_yaml(cfg, comments=True)
    probe = final.with_name(f".{final.name}.probe-{os.getpid()}")
    try:
        probe.write_text(text, encoding="utf-8")
        if config_to_dict(load_config(probe)) != config_to_dict(cfg):
            raise QuickstartError(f"{final}: the written YAML does not read back to the same config (a bug)")
    finally:
        probe.unlink(missing_ok=True)
    return atomic_write_text(final, text)


# ----------------------------------------------------------------------------- memory plan
@dataclass(frozen=True)
class Candidate:
    """One setting the planner may choose."""

    batch_size: int
    rank: int
    gradient_checkpointing: bool

    @property
    def label(self) -> str:
        return f"batch {self.batch_size}, rank {self.rank}, checkpointing {'on' if self.gradient_checkpointing else 'off'}"


# Largest first: what each step gives up costs more the later it comes (speed, then batch, then capacity).
DEFAULT_LADDER: tuple[Candidate, ...] = (
    Candidate(4, 16, False),
    Candidate(4, 16, True),
    Candidate(2, 16, True),
    Candidate(1, 16, True),
    Candidate(1, 8, True),
)


@dataclass
class Measurement:
    """One dry run. ``status``: ``ok``, ``oom`` (ran out of memory: does not fit), ``unparsed``
    (finished but the report could not be read) or ``failed`` (any other error)."""

    status: str
    peak_gib: float | None = None
    step_seconds: float | None = None
    detail: str = ""


@dataclass
class Plan:
    """The measured rows and the choice. ``chosen`` is None when the dry-run output could not be
    parsed (the base config's values are kept); ``fits`` is False when no candidate fitted (then
    ``chosen`` is the smallest one)."""

    budget_gib: float
    limit_gib: float
    rows: list[tuple[Candidate, Measurement]]
    chosen: Candidate | None
    fits: bool


_PEAK = re.compile(r"peak\s+memory\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B)\b", re.IGNORECASE)
_STEP = re.compile(r"step\s+time\b[^:\n]*:\s*(?:median\s+)?([0-9]+(?:\.[0-9]+)?)\s*(ms|s)\b", re.IGNORECASE)
_OOM = re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc|MemoryError", re.IGNORECASE)


def parse_dry_run(text: str) -> tuple[float, float] | None:
    """``(peak memory in GiB, step time in s)`` from ``train_lora.py --dry_run`` output, or None.

    Accepts ``peak memory: 1.23 GiB`` (also MiB/GB/MB...) and ``step time (...): 0.123 s`` (or ms),
    in any case, anywhere in the text (the last occurrence wins).
    """
    peaks, steps = _PEAK.findall(text), _STEP.findall(text)
    if not peaks or not steps:
        return None
    value, unit = peaks[-1]
    power = "kmgt".index(unit[0].lower()) + 1
    binary = "i" in unit.lower()
    bytes_per_unit = 1024**power if binary else 1000**power
    seconds, sunit = steps[-1]
    return float(value) * bytes_per_unit / 2**30, float(seconds) / (1000.0 if sunit.lower() == "ms" else 1.0)


def read_dry_run_json(path: str | os.PathLike[str]) -> tuple[float, float] | None:
    """``(peak memory in GiB, median step time in s)`` from a ``--dry_run_json`` report, or None."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        return float(report["peak_memory_gib"]), float(report["step_seconds_median"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def classify_dry_run(returncode: int, output: str, report: tuple[float, float] | None = None) -> Measurement:
    """Turns a finished dry run (exit code, combined output, its JSON report) into a :class:`Measurement`;
    the text is parsed only when there is no report."""
    if returncode == 0:
        parsed = report or parse_dry_run(output)
        if parsed is None:
            return Measurement("unparsed", detail=_tail(output))
        return Measurement("ok", parsed[0], parsed[1])
    if _OOM.search(output) or returncode in (-9, 137):  # 137/-9: killed, usually by the kernel's OOM killer
        return Measurement("oom", detail=_tail(output, 3))
    return Measurement("failed", detail=_tail(output))


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def dry_run_command(config: str | os.PathLike[str], c: Candidate, base_alpha_ratio: float,
                    report: str | os.PathLike[str] | None = None) -> list[str]:  # fmt: skip
    """The ``train_lora.py --dry_run`` command measuring one candidate (writing its JSON report to ``report``)."""
    return [sys.executable, str(REPO_ROOT / TRAIN_SCRIPT), "--config", str(config), "--dry_run",
            *(["--dry_run_json", str(report)] if report else []),
            "--train.batch_size", str(c.batch_size), "--lora.rank", str(c.rank),
            "--lora.alpha", repr(float(c.rank * base_alpha_ratio)),
            "--model.gradient_checkpointing", "true" if c.gradient_checkpointing else "false",
            "--logging.progress_bar", "false"]  # fmt: skip


def subprocess_measure(config: str | os.PathLike[str], gpus: int, alpha_ratio: float = 1.0,
                       timeout: float | None = None) -> Callable[[Candidate], Measurement]:  # fmt: skip
    """A measuring function that runs one real dry run per candidate (on the CPU when ``gpus`` is 0)."""
    env = dict(os.environ)
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # measure where the run will train

    def measure(c: Candidate) -> Measurement:
        with tempfile.TemporaryDirectory(prefix="midi-dry-run-") as folder:
            report = Path(folder) / "report.json"
            try:
                proc = subprocess.run(dry_run_command(config, c, alpha_ratio, report), cwd=REPO_ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                return Measurement("failed", detail=f"the dry run took more than {timeout:g} s")
            if proc.returncode in (130, -2):
                raise KeyboardInterrupt
            return classify_dry_run(proc.returncode, proc.stdout, read_dry_run_json(report))

    return measure


def plan_settings(candidates: Sequence[Candidate], measure: Callable[[Candidate], Measurement], budget_gib: float,
                  headroom: float = HEADROOM, progress: Callable[[str], None] = info) -> Plan:  # fmt: skip
    """Measures candidates largest first and picks the first whose peak fits ``(1 - headroom) x budget``.

    Stops at the first fit (smaller candidates would fit too). An out-of-memory dry run counts as
    not fitting. An unparsable report ends the plan with ``chosen=None`` (keep the base config).

    Raises:
        QuickstartError: a dry run failed for another reason than memory (its output tail is included).
    """
    if budget_gib <= 0:
        raise QuickstartError(f"memory budget must be > 0 GB, got {budget_gib:g}")
    if not candidates:
        raise QuickstartError("no candidate settings to measure")
    limit = budget_gib * (1.0 - headroom)
    rows: list[tuple[Candidate, Measurement]] = []
    for c in candidates:
        progress(f"  measuring {c.label} (train_lora.py --dry_run) ...")
        m = measure(c)
        rows.append((c, m))
        if m.status == "failed":
            raise QuickstartError(f"the dry run of {c.label} failed:\n{m.detail}")
        if m.status == "unparsed":
            progress("  could not read peak memory / step time from the dry-run output (its format changed?); "
                     "keeping the base config's batch size, rank and checkpointing")  # fmt: skip
            return Plan(budget_gib, limit, rows, None, True)
        if m.status == "ok" and m.peak_gib is not None and m.peak_gib <= limit:
            return Plan(budget_gib, limit, rows, c, True)
    return Plan(budget_gib, limit, rows, candidates[-1], False)


def format_plan(plan: Plan) -> str:
    """The measured table, with the choice marked."""
    width = max(len(c.label) for c, _ in plan.rows)
    headroom = 1.0 - plan.limit_gib / plan.budget_gib
    lines = [f"  {'setting':<{width}}  {'peak memory':>12}  {'step time':>9}  fits in {plan.limit_gib:.1f} GiB "
             f"(budget {plan.budget_gib:g} GB - {headroom:.0%} headroom)"]  # fmt: skip
    for c, m in plan.rows:
        if m.status == "ok":
            peak, step = f"{m.peak_gib:.2f} GiB", f"{m.step_seconds:.3f} s"
            fits = "yes" if m.peak_gib <= plan.limit_gib else "no"
        else:
            peak, step, fits = {"oom": "out of memory"}.get(m.status, m.status), "-", "no" if m.status == "oom" else "?"
        mark = "  <- chosen" if c == plan.chosen and plan.fits else ""
        lines.append(f"  {c.label:<{width}}  {peak:>12}  {step:>9}  {fits}{mark}")
    if plan.chosen is not None and not plan.fits:
        lines.append(f"  nothing fits; the smallest setting ({plan.chosen.label}) is over the budget")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
@dataclass
class TrainCommand:
    """The training command: environment prefix + argv, run from the repository root."""

    env: dict[str, str]
    argv: list[str]

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def _display_exe(path: str) -> str:
    """``python`` when ``path`` is what PATH finds under that name, else the path (repo-relative if inside)."""
    name = Path(path).name
    found = shutil.which(name)
    if found and os.path.abspath(found) == os.path.abspath(path):
        return name
    return display_path(path) if os.path.isabs(path) or os.sep in path else path


def training_command(config: str, gpus: int, python: str, accelerate_config_path: str,
                     visible_gpus: int = 0) -> TrainCommand:  # fmt: skip
    """``accelerate launch`` for several GPUs, plain ``python train_lora.py`` for one GPU or the CPU.

    On the CPU with GPUs visible, ``CUDA_VISIBLE_DEVICES=`` keeps the run off them.
    """
    config = display_path(config)
    if gpus >= 2:
        launcher = Path(python).parent / "accelerate"
        if launcher.exists():
            exe = [_display_exe(str(launcher)), "launch"]
        else:
            exe = [_display_exe(python), "-m", "accelerate.commands.launch"]
        return TrainCommand({}, [*exe, "--config_file", display_path(accelerate_config_path), TRAIN_SCRIPT,
                                 "--config", config])  # fmt: skip
    env = {"CUDA_VISIBLE_DEVICES": ""} if gpus == 0 and visible_gpus > 0 else {}
    return TrainCommand(env, [_display_exe(python), TRAIN_SCRIPT, "--config", config])


def write_train_script(path: str | os.PathLike[str], command: TrainCommand, root: Path = REPO_ROOT) -> Path:
    """``train.sh``: runs the command from the repository root; extra arguments are passed on
    (e.g. ``--resume_from_checkpoint latest``)."""
    text = ("#!/usr/bin/env bash\n# Written by quickstart_lora_training.sh. Extra arguments go to train_lora.py, e.g.\n"
            f"#   bash {display_path(path)} --resume_from_checkpoint latest\nset -euo pipefail\n"
            f"cd {shlex.quote(str(root))}\nexec {command.shell()} \"$@\"\n")  # fmt: skip
    return atomic_write_text(path, text, mode=0o755)


# ----------------------------------------------------------------------------- command line
def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The subcommands (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m midi.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("doctor", help="environment report; key=value lines on stdout")
    s.add_argument("--requirements", type=Path, default=REPO_ROOT / "requirements.txt")
    s.add_argument("--disk-path", type=Path, default=REPO_ROOT, help="where the disk space is checked")
    s = sub.add_parser("deps", help="exit 1 when a required pinned package is missing")
    s.add_argument("--requirements", type=Path, default=REPO_ROOT / "requirements.txt")
    sub.add_parser("default-model", help="pretrained_weights/MIDI-3D if it holds a pipeline, else tiny")
    s = sub.add_parser("check-model", help="validate a model answer; prints model=, base_config=, tiny=")
    s.add_argument("model")
    s = sub.add_parser("run-name", help="validate --name, or suggest a free one")
    s.add_argument("--runs-dir", type=Path, required=True)
    s.add_argument("--model", default=TINY_MODEL)
    s.add_argument("--name")
    s = sub.add_parser("detect-data", help="what a data folder holds; prints kind=, path=, prepared_dir=")
    s.add_argument("path")
    s = sub.add_parser("config-value", help="print one value of a config file, e.g. data.image_size")
    s.add_argument("--config", required=True)
    s.add_argument("key", nargs="+")
    s = sub.add_parser("write-accelerate", help="write an accelerate config (0 = CPU)")
    s.add_argument("--gpus", type=int, required=True)
    s.add_argument("--visible-gpus", type=int)
    s.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("write-config", help="write the run's training config (validated, atomic)")
    s.add_argument("--base", required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--model")
    s.add_argument("--data-root")
    s.add_argument("--output-dir")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--rank", type=int)
    s.add_argument("--gradient-checkpointing", type=_bool)
    s.add_argument("--note", default="")
    s = sub.add_parser("plan", help="pick batch size / checkpointing / rank from dry runs")
    s.add_argument("--config", required=True)
    s.add_argument("--budget-gb", type=_positive_float, required=True)
    s.add_argument("--gpus", type=int, default=0)
    s.add_argument("--headroom", type=float, default=HEADROOM)
    s.add_argument("--timeout", type=float, help="seconds per dry run")
    s.add_argument("--write", action="store_true", help="rewrite --config with the chosen values")
    s.add_argument("--note", default="", help="with --write: the config header's note")
    s = sub.add_parser("command", help="print the training command (and write train.sh)")
    s.add_argument("--config", required=True)
    s.add_argument("--gpus", type=int, required=True)
    s.add_argument("--visible-gpus", type=int, default=0)
    s.add_argument("--python", default=sys.executable)
    s.add_argument("--accelerate-config", required=True)
    s.add_argument("--script", type=Path, help="also write this train.sh")
    return p


def _cmd_plan(args: argparse.Namespace) -> int:
    from midi.config import load_config

    cfg = load_config(args.config)
    ratio = cfg.lora.alpha / cfg.lora.rank
    workers = f"{args.gpus} GPU(s)" if args.gpus else "the CPU"
    info(f"Planning memory on {workers}: budget {args.budget_gb:g} GB per process, up to {len(DEFAULT_LADDER)} "
         "dry runs (largest setting first, each builds the model and times two real steps)")  # fmt: skip
    plan = plan_settings(DEFAULT_LADDER, subprocess_measure(args.config, args.gpus, ratio, args.timeout),
                         args.budget_gb, args.headroom)  # fmt: skip
    info(format_plan(plan))
    chosen = plan.chosen
    if chosen is None:
        chosen = Candidate(cfg.train.batch_size, cfg.lora.rank, cfg.model.gradient_checkpointing)
    if args.write and plan.fits and plan.chosen is not None:
        settings = RunSettings(batch_size=chosen.batch_size, rank=chosen.rank,
                               gradient_checkpointing=chosen.gradient_checkpointing)  # fmt: skip
        m = dict(plan.rows)[chosen]
        note = f"{args.note}; " if args.note else ""
        note += f"memory plan: {chosen.label}, measured peak {m.peak_gib:.2f} GiB for a {args.budget_gb:g} GB budget"
        write_run_config(build_run_config(args.config, settings), args.config, note=note)
    emit(batch_size=chosen.batch_size, rank=chosen.rank, gradient_checkpointing=chosen.gradient_checkpointing,
         fits=plan.fits, measured=plan.chosen is not None)  # fmt: skip
    return EXIT_OK if plan.fits else EXIT_NO_FIT


def run_command(args: argparse.Namespace) -> int:
    """Runs one subcommand; returns the exit code."""
    if args.command == "doctor":
        ok, values = doctor(args.requirements, args.disk_path)
        emit(**values)
        return EXIT_OK if ok else EXIT_FAILED
    if args.command == "deps":
        missing = missing_required(check_dependencies(args.requirements))
        for s in missing:
            info(f"  missing: {s.name}=={s.wanted}")
        return EXIT_FAILED if missing else EXIT_OK
    if args.command == "default-model":
        print(default_model())
        return EXIT_OK
    if args.command == "check-model":
        choice = check_model(args.model)
        need = MIN_DISK_GB_TINY if choice.tiny else MIN_DISK_GB_REAL
        free = disk_free_gib(REPO_ROOT)
        if free < need:
            info(f"warning: only {free:.1f} GiB free disk; {'the tiny demo' if choice.tiny else 'real training'} "
                 f"wants >= {need:g} GB")  # fmt: skip
        emit(model=choice.model, base_config=choice.base_config, tiny=choice.tiny)
        return EXIT_OK
    if args.command == "run-name":
        print(check_run_name(args.name, args.runs_dir) if args.name else suggest_run_name(args.runs_dir, args.model))
        return EXIT_OK
    if args.command == "detect-data":
        d = detect_data(args.path)
        info(d.message)
        emit(kind=d.kind, path=d.path, scenes=d.scenes, prepared_dir=d.prepared_dir)
        return EXIT_OK
    if args.command == "config-value":
        from midi.config import load_config

        cfg = load_config(args.config)
        for key in args.key:
            section, _, name = key.partition(".")
            print(getattr(getattr(cfg, section), name))
        return EXIT_OK
    if args.command == "write-accelerate":
        write_accelerate_config(args.out, args.gpus, args.visible_gpus)
        return EXIT_OK
    if args.command == "write-config":
        shown = {k: None if v is None else display_path(v) for k, v in
                 (("data_root", args.data_root), ("output_dir", args.output_dir))}  # fmt: skip
        model = args.model if args.model in (None, TINY_MODEL) else display_path(args.model)
        settings = RunSettings(model, shown["data_root"], shown["output_dir"], args.max_steps, args.batch_size,
                               args.rank, args.gradient_checkpointing)  # fmt: skip
        write_run_config(build_run_config(args.base, settings), args.out, note=args.note)
        return EXIT_OK
    if args.command == "plan":
        return _cmd_plan(args)
    if args.command == "command":
        cmd = training_command(args.config, args.gpus, args.python, args.accelerate_config, args.visible_gpus)
        if args.script:
            write_train_script(args.script, cmd)
        print(cmd.shell())
        return EXIT_OK
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``error:`` lines and exit code 2 for bad input, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        info("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        config = sys.modules.get("midi.config")
        if not isinstance(exc, QuickstartError) and not (config and isinstance(exc, config.ConfigError)):
            raise
        for line in str(exc).splitlines():
            info(f"error: {line}")
        return EXIT_USAGE

if __name__ == "__main__":
    sys.exit(main())
