"""The quickstart wizard behind ``quickstart_lora_training.sh``: from a clone to a running LoRA finetune.

    bash quickstart_lora_training.sh                   # asks each question; Enter accepts the [default]
    bash quickstart_lora_training.sh --yes --model midi-mini --data synthetic --gpus 0 --no_train

Steps: environment report, base model, run name, data, GPUs, memory plan (real dry runs), then
``runs/<name>/config.yaml``, the training command and training. A failure or Ctrl-C before training
starts removes what this invocation created. Exit codes: 0 done, 1 a step failed, 2 bad input,
130 interrupted (143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from midi import memory_plan
from midi.config import (
    DEFAULT_MODEL_DIR,
    DOWNLOAD_HINT,
    MESH_SUFFIXES,
    TINY_MODEL,
    check_model_path,
    config_to_yaml,
    is_tiny,
)
from midi.config_load import load_config
from midi.data import atomic, layout
from midi.errors import InputError, TrainingError, run_cli

REPO_ROOT = memory_plan.REPO_ROOT
# the base config of each kind of model: tiny (random, in-process), midi-mini (trained here), the release
CONFIGS = {TINY_MODEL: "configs/train/tiny.yaml", "mini": "configs/train/mini_lora.yaml",
           "midi": "configs/train/lora_finetune.yaml"}
MINI_MODEL, MINI_DIR = "midi-mini", "models/midi-mini"  # the answer and the folder it stands for
ACCELERATE_CONFIGS = {1: "configs/accelerate/single_gpu.yaml", 2: "configs/accelerate/multi_gpu.yaml"}
MIN_DISK_GB = {True: 1.0, False: 20.0}  # tiny or midi-mini / real model (weights ~10 GB + checkpoints + a cache)
CPU_BUDGET_FRACTION = 0.8  # default CPU budget: this fraction of the available RAM
OPTIONAL_PACKAGES = ("pytest", "pexpect", "ruff")  # test/lint tools: missing = warning only
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def rel(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the working directory when it lies below it (shorter defaults), else absolute."""
    p = Path(os.path.abspath(path))
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


class Asker:
    """Questions with a ``[default]``: Enter accepts it, ``yes`` takes every default, a flag answers its
    question. ``check`` turns the answer into a value or raises :class:`InputError`: a typed answer is
    then asked again, a flag or ``--yes`` answer ends the wizard."""

    def __init__(self, yes: bool = False, read: Callable[[str], str] = input) -> None:
        self.yes, self.read = yes, read

    def __call__(self, question: str, default: str, check: Callable[[str], object] = str, given: str | None = None,
                 shown: str | None = None):
        prompt = f"{question} [{default if shown is None else shown}]: "
        if given is not None or self.yes:
            print(prompt + (answer := default if given is None else given))
            return check(answer)
        while True:
            try:
                answer = self.read(prompt).strip() or default
            except EOFError:
                raise InputError(f'no answer to "{question}" (input closed); use --yes or give the values as '
                                 "flags (--help)") from None
            try:
                return check(answer)
            except InputError as exc:
                print(f"  {exc}")

    def yes_no(self, question: str, default: bool) -> bool:
        def check(answer: str) -> bool:
            if answer.lower() not in ("y", "yes", "n", "no"):
                raise InputError("please answer y or n")
            return answer.lower().startswith("y")

        return self(question, "y" if default else "n", check, shown="Y/n" if default else "y/N")


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """A check: an integer in ``[low, high]``."""
    def check(answer: str) -> int:
        if not answer.isdigit() or int(answer) < low or (high is not None and int(answer) > high):
            raise InputError(f"{answer!r}: give a whole number >= {low}" + (f" and <= {high}" if high is not None else ""))
        return int(answer)

    return check


def positive_gb(answer: str) -> float:
    try:
        if float(answer) > 0:
            return float(answer)
    except ValueError:
        pass
    raise InputError(f"{answer!r}: give a number of GB > 0, e.g. 24")


# ----------------------------------------------------------------------------- checks
def doctor(requirements: Path = REPO_ROOT / "requirements.txt", disk: Path = REPO_ROOT) -> bool:
    """Prints the environment report (Python, pinned packages, torch/CUDA, GPUs, RAM, disk); False when
    Python is too old or a required package is missing (the rest only warns)."""
    ok = sys.version_info >= (3, 10)
    print(f"  [{' ok ' if ok else 'FAIL'}] Python {platform.python_version()} ({sys.executable})"
          + ("" if ok else ": needs >= 3.10"))
    for line in requirements.read_text(encoding="utf-8").splitlines():
        name, pinned, wanted = line.split("#", 1)[0].strip().partition("==")
        if not pinned:
            continue
        got = next((dist.version for dist in importlib.metadata.distributions(name=name)), None)  # None: missing
        if got is None and name not in OPTIONAL_PACKAGES:
            ok = False
            print(f"  [FAIL] {name} is not installed (fix: {sys.executable} -m pip install -r {rel(requirements)})")
        elif got is None or got.split("+")[0] != wanted:
            print(f"  [warn] {name}: {got or 'not installed'}, requirements.txt pins {wanted}")
    print(f"  [ ok ] torch {torch.__version__} ({f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU-only build'})")
    for i, props in enumerate(map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))):
        print(f"  [ ok ] GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    if not torch.cuda.device_count():
        print("  [warn] nvidia-smi is installed but torch sees no GPU: install a CUDA build of torch (README.md)"
              if shutil.which("nvidia-smi") else "  [info] no CUDA GPU visible: training runs on the CPU (fine for "
              "the tiny demo; the real model wants a GPU with >= 24 GB)")
    ram = psutil.virtual_memory()
    print(f"  [info] RAM: {ram.total / 2**30:.1f} GiB total, {ram.available / 2**30:.1f} GiB available")
    free = shutil.disk_usage(disk).free / 2**30
    print(f"  [{' ok ' if free >= MIN_DISK_GB[False] else 'warn'}] disk: {free:.1f} GiB free at {disk} (real training "
          f"wants >= {MIN_DISK_GB[False]:g} GB, the tiny demo {MIN_DISK_GB[True]:g} GB)")
    return ok


def default_model(root: Path = REPO_ROOT) -> str:
    """The downloaded weights when they are there, else midi-mini (shipped in the repo), else ``tiny``."""
    for folder in (DEFAULT_MODEL_DIR, MINI_DIR):
        if (root / folder / "model_index.json").is_file():
            return rel(root / folder)
    return TINY_MODEL


def check_model(answer: str) -> str:
    """``tiny``, or the absolute path of a MIDI-3D pipeline folder (``midi-mini``: the shipped one;
    ModelError with the download hint)."""
    if answer.lower() == TINY_MODEL:
        return TINY_MODEL
    path = REPO_ROOT / MINI_DIR if answer.lower() == MINI_MODEL else Path(answer).expanduser()
    check_model_path(path)
    return os.path.abspath(path)


def model_kind(model: str) -> str:
    """``tiny``, ``mini`` (the shipped midi-mini) or ``midi`` (a release-size folder): picks the base config."""
    if is_tiny(model):
        return TINY_MODEL
    return "mini" if Path(model).resolve() == (REPO_ROOT / MINI_DIR).resolve() else "midi"


def suggest_name(runs_dir: Path, kind: str) -> str:
    """``tiny-lora`` / ``mini-lora`` / ``midi-lora``, numbered ``-2``, ``-3``... when that run folder exists."""
    stem = f"{kind}-lora"
    return next(n for n in (stem, *(f"{stem}-{k}" for k in range(2, 10**6))) if not (runs_dir / n).exists())


def check_name(name: str, runs_dir: Path) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(f"{name!r}: a run name is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    if (runs_dir / name).exists():
        raise InputError(f"{runs_dir / name} already exists; choose another name (or resume that run with train_lora.py "
                         "--config <its config.yaml> --resume_from_checkpoint latest)")
    return name


def data_kind(root: Path) -> str:
    """``midi-scenes`` or ``3d-front`` (training data as it is), ``raw`` (meshes for prepare_data.py)."""
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    if (kind := layout.detect_layout(root)) is not None:
        return kind
    if any(p.suffix.lower() in MESH_SUFFIXES and p.is_file() for glob in ("*", "*/*") for p in root.glob(glob)):
        return "raw"
    raise InputError(f"{root}: no manifest.json, no 3D-Front layout and no mesh files ({', '.join(MESH_SUFFIXES)}) "
                     "in it or its subfolders")


def training_command(config: Path, gpus: int, visible: int, python: str = sys.executable) -> str:
    """Plain ``python train_lora.py`` on the CPU; ``accelerate launch`` with a shipped config on GPUs."""
    script = ["train_lora.py", "--config", str(config)]
    if gpus == 0:
        return ("CUDA_VISIBLE_DEVICES= " if visible else "") + shlex.join([python, *script])
    launch = [python, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIGS[min(gpus, 2)]]
    if gpus >= 2:
        launch += ["--num_processes", str(gpus)] + (["--gpu_ids", ",".join(map(str, range(gpus)))] if gpus < visible else [])
    return shlex.join(launch + script)


# ----------------------------------------------------------------------------- the wizard
class Wizard:
    """The steps in order; ``created`` holds what this invocation made (removed unless it finishes)."""

    def __init__(self, args: argparse.Namespace, ask: Asker) -> None:
        self.args, self.ask = args, ask
        self.runs_dir = Path(os.path.abspath(args.runs_dir))
        self.created: list[Path] = []

    def run(self) -> None:
        print("MIDI-3D LoRA quickstart: sets up a finetuning run in 7 steps.\nEvery question shows its default in "
              "[brackets]; press Enter to accept it. Ctrl-C stops and cleans up.")
        for step, (title, fn) in enumerate([("Environment check", self.check), ("Base model", self.choose_model),
                                            ("Run name", self.choose_name), ("Training data", self.choose_data),
                                            ("GPUs", self.choose_gpus), ("Memory plan", self.plan_memory),
                                            ("Ready", self.start)], 1):
            print(f"\n== {step}/7 {title}")
            fn()

    def check(self) -> None:
        if not doctor():
            raise TrainingError("the environment check failed (the [FAIL] lines above say how to fix it)")

    def choose_model(self) -> None:
        default = default_model()
        if self.args.model is None:
            print("The LoRA is trained on a MIDI-3D pipeline folder (with model_index.json); without a GPU try "
                  f"'{MINI_MODEL}' ({MINI_DIR}, a small MIDI trained here on primitives: a LoRA teaches it furniture "
                  "on a laptop CPU in minutes), or 'tiny' (a random toy model: tests the tools, learns nothing).")
            if not (REPO_ROOT / DEFAULT_MODEL_DIR / "model_index.json").is_file():
                print(f"No weights in {DEFAULT_MODEL_DIR} yet. To get the real model:\n  {DOWNLOAD_HINT}")
        self.model = self.ask(f"Base model folder, '{MINI_MODEL}' or 'tiny'", default, check_model, self.args.model)
        self.kind = model_kind(self.model)
        self.tiny = self.kind != "midi"  # small enough for a laptop CPU
        self.base = REPO_ROOT / CONFIGS[self.kind]
        self.base_cfg = load_config(self.base)
        free = shutil.disk_usage(REPO_ROOT).free / 2**30
        if free < MIN_DISK_GB[self.tiny]:
            print(f"warning: only {free:.1f} GiB free disk; this run wants >= {MIN_DISK_GB[self.tiny]:g} GB")
        print(f"base model: {self.model}; the run starts from {rel(self.base)}")

    def choose_name(self) -> None:
        self.name = self.ask(f"Run name (its folder: {rel(self.runs_dir)}/<name>)", suggest_name(self.runs_dir, self.kind),
                             lambda n: check_name(n, self.runs_dir), self.args.name)
        missing = [p for p in (self.runs_dir, *self.runs_dir.parents) if not p.exists()]
        self.run_dir, self.config_path = self.runs_dir / self.name, self.runs_dir / self.name / "config.yaml"
        self.run_dir.mkdir(parents=True)
        self.created += [*missing[-1:], self.run_dir]
        print(f"run folder: {self.run_dir} (removed again if the wizard stops before the end)")

    def python(self, *argv: object) -> int:
        """Runs a repository script with this interpreter, showing the command; returns its exit code."""
        cmd = [sys.executable, *map(str, argv)]
        print(f"$ {shlex.join(cmd)}", flush=True)
        return subprocess.run(cmd, cwd=REPO_ROOT).returncode

    def choose_data(self) -> None:
        prepared = REPO_ROOT / "data" / "midi-scenes"
        default = rel(prepared) if not self.tiny and (prepared / layout.MANIFEST).is_file() else "synthetic"
        if self.args.data is None:
            print("Give one of: a prepared dataset (prepare_data.py output, with manifest.json); a 3D-Front root; a "
                  f"folder of raw meshes (one subfolder per scene with {'/'.join(MESH_SUFFIXES)} files, optionally "
                  "images + instance id maps); or 'synthetic' for generated demo scenes (a smoke test).")
        self.data_root = self.ask("Data folder, or 'synthetic'", default, self.use_data, self.args.data)

    def use_data(self, answer: str) -> Path:
        """Generates, prepares and checks the answered data; InputError when it cannot be used."""
        size = ("--image_size", self.base_cfg.data.image_size, "--num_samples", self.base_cfg.data.num_surface_points)
        if answer.lower() == "synthetic":
            n = self.ask("How many synthetic scenes?", "8", whole_number(2), self.args.num_synthetic)
            root = self.run_dir / "data"
            # midi-mini knows the base domain (primitives): its LoRA is for the furniture it never saw
            domain = "target" if self.kind == "mini" else "base"
            what = "furniture" if domain == "target" else "primitives"
            print(f"Generating {n} synthetic scenes ({what} on a floor, rendered with instance maps) into {root}")
            if self.python("prepare_data.py", "--synthetic", n, "--synthetic_domain", domain, "--output_dir", root,
                           *size):
                raise TrainingError("prepare_data.py --synthetic failed (see above)")
            return self.check_data(root)
        root = Path(os.path.abspath(Path(answer).expanduser()))
        if data_kind(root) != "raw":
            return self.check_data(root)
        out = root.with_name(f"{root.name}_prepared")
        if not self.ask.yes_no(f"Prepare these meshes into {out} with prepare_data.py?", True):
            raise InputError("then give a prepared dataset instead")
        print(f"Preparing {root} into {out} (re-running skips finished scenes)")
        rc = self.python("prepare_data.py", "--input_dir", root, "--output_dir", out, *size)
        manifest = out / layout.MANIFEST
        if rc > 1 or not manifest.is_file() or not json.loads(manifest.read_text(encoding="utf-8")).get("scenes"):
            raise InputError(f"prepare_data.py wrote no scene from {root} (reasons above); fix the inputs or give other data")
        if rc == 1:
            print("warning: some scenes were skipped (reasons above); continuing with the others")
        return self.check_data(out)

    def check_data(self, root: Path) -> Path:
        report = self.run_dir / "data-check"
        if (rc := self.python("prepare_data.py", "--check", root, "--report_dir", report)) == 0:
            print(f"data check passed (contact sheet of the scenes: {report / 'contact_sheet.png'})")
            return root
        if rc == 1 and self.ask.yes_no(f"The check found errors (see above and {report / 'check_report.json'}). "
                                       "Use this data anyway?", False):
            return root
        raise InputError(f"{root}: the data check failed (see above)")

    def choose_gpus(self) -> None:
        self.visible = torch.cuda.device_count()
        print(f"{self.visible} GPU(s) visible: 1 = one GPU, 2 or more = data-parallel with accelerate (DDP)."
              if self.visible else "No GPU visible: 0 = train on the CPU.")
        self.gpus = self.ask("How many GPUs to train on (0 = CPU)", str(self.visible), whole_number(0, self.visible),
                             self.args.gpus)
        if self.gpus == 0 and not self.tiny:
            print("warning: the real MIDI-3D model on the CPU is very slow (minutes per step); a smoke test only")

    def write_config(self, extra: list[str] = (), note: str = "") -> None:
        """Validates the run's config (paths included) and writes it atomically."""
        steps = [] if self.args.max_steps is None else ["--train.max_steps", self.args.max_steps]
        cfg = load_config(self.base, ["--model.pretrained_model_name_or_path", self.model, "--data.root",
                                      str(self.data_root), "--data.synthetic_if_missing", "0", "--train.output_dir",
                                      str(self.run_dir), *extra, *steps], environment=True)
        header = (f"# Training config written by quickstart_lora_training.sh (run {self.name}, from {rel(self.base)}"
                  f"{note}).\n# Every key carries its doc; TRAINING_README.md explains them. Check it: "
                  "python train_lora.py --config THIS --dry_run\n")
        atomic.write_text(self.config_path, header + config_to_yaml(cfg, comments=True))

    def plan_memory(self) -> None:
        self.write_config()
        if self.args.no_measure:
            print(f"Skipping the dry runs (--no_measure): keeping the batch size, LoRA rank and checkpointing of "
                  f"{rel(self.base)}.")
            return
        print("Dry runs (train_lora.py --dry_run: builds the model and times real steps) pick the largest batch "
              "size / LoRA rank / checkpointing whose peak memory fits the budget with 10% headroom; "
              + ("about half a minute each with a small model." if self.tiny else "a few minutes each, at most 5."))
        gpu_gib = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(self.gpus)]
        default = min(gpu_gib) if gpu_gib else max(1.0, psutil.virtual_memory().available / 2**30 * CPU_BUDGET_FRACTION)
        budget = self.ask(f"Memory budget per process in GB ({'GPU memory' if self.gpus else 'RAM'})", f"{default:.1f}",
                          positive_gb, self.args.memory_gb)
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if self.gpus == 0 else {})}
        ratio = self.base_cfg.lora.alpha / self.base_cfg.lora.rank
        plan = memory_plan.plan_settings(memory_plan.DEFAULT_LADDER,
                                         memory_plan.subprocess_measure(self.config_path, env, ratio), budget)
        print(memory_plan.format_plan(plan))
        if (c := plan.chosen) is None:
            return
        if not plan.fits:
            print(f"No setting fits in {budget:g} GB. Options: more memory, fewer instances per scene "
                  "(data.max_num_instances) or smaller images (data.image_size) in the config.")
            if not self.ask.yes_no("Use the smallest setting anyway (it may run out of memory)?", False):
                raise TrainingError("no setting fits the memory budget")
        self.write_config(c.overrides(ratio), f"; memory plan: {c.label}, measured peak "
                          f"{dict(plan.rows)[c].peak_gib:.2f} GiB for a {budget:g} GB budget")

    def start(self) -> None:
        self.created.clear()  # the run folder is complete: nothing is removed from here on
        self.command = training_command(self.config_path, self.gpus, self.visible)
        print(f"run folder: {self.run_dir}\n  config.yaml  the training config (validated; every key documented)\n"
              f"Training command (run it from {REPO_ROOT}):\n  {self.command}")
        if self.args.no_train:
            print("Not starting training (--no_train).")
            return
        if not self.ask.yes_no("Start training now?", True):
            print("Not started; run the command above when you are ready.")
            return
        try:
            rc = subprocess.run(self.command, shell=True, cwd=REPO_ROOT).returncode
        except KeyboardInterrupt:
            print(f"\ntraining interrupted; the run folder is kept. Continue with:\n  {self.command} "
                  "--resume_from_checkpoint latest")
            raise
        if rc:
            raise TrainingError(f"training stopped with exit code {rc} (see above); continue it with: "
                                f"{self.command} --resume_from_checkpoint latest")
        print(f"Training finished: the adapter is in {self.run_dir / 'lora-final'} (inference: see README.md).")

    def cleanup(self) -> None:
        for path in reversed(self.created):
            shutil.rmtree(path, ignore_errors=True)
            print(f"cleaned up: removed {path} (created by this invocation, unfinished)")
        self.created.clear()


FLAGS = (("--model", "base model: a MIDI-3D pipeline folder (with model_index.json), 'midi-mini' or 'tiny'"),
         ("--data", "prepared dataset, 3D-Front root, raw meshes, or 'synthetic'"),
         ("--num_synthetic", "synthetic scenes to generate (default 8)"),
         ("--gpus", "GPUs to train on (default: all visible; 0 = CPU)"),
         ("--memory_gb", "memory budget per process in GB (default: the GPU's memory, or 80%% of the available RAM)"),
         ("--name", "run name (default tiny-lora / mini-lora / midi-lora, numbered when taken)"),
         ("--max_steps", "train.max_steps for a quick run (default: the base config's)"),
         ("--no_measure", "skip the dry runs; keep the base config's batch size, rank, checkpointing"),
         ("--no_venv", "(launcher) use python3 on PATH as it is, with no .venv"),
         ("--no_train", "stop after writing the config and printing the command"),
         ("--yes", "accept every default (non-interactive)"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash quickstart_lora_training.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Environment: MIDI_PYTHON=/path/to/python runs the wizard with that "
                                       "interpreter as is; PYTHON=python3.11 picks the one that creates .venv.")
    for flag, text in FLAGS:
        flags = (flag, "-y") if flag == "--yes" else (flag,)
        p.add_argument(*flags, help=text, **{"action": "store_true"} if flag.startswith(("--no_", "--yes")) else {})
    p.add_argument("--runs_dir", default=str(REPO_ROOT / "runs"), help="where run folders go (default: runs/ here)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, read: Callable[[str], str] = input) -> int:
    """Runs the wizard; returns the exit code (what was created is removed unless it finished)."""
    args = parse_args(argv)
    wizard = Wizard(args, Asker(args.yes, read))
    try:
        code = run_cli(lambda _: wizard.run() or 0)  # errors: one line each, the error's exit code; Ctrl-C: 130
    except SystemExit as exc:  # SIGTERM: 143
        code = exc.code if isinstance(exc.code, int) else 1
    if code:
        wizard.cleanup()
    return code


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
