"""The quickstart's memory plan: real ``train_lora.py --dry_run`` runs pick the batch size, LoRA rank
and gradient checkpointing whose measured peak memory fits a budget.

Each dry run writes its JSON report (``--dry_run_json``); only that report is read, never the text.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from midi.config import DRY_RUN_JSON
from midi.errors import TrainingError

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 0.10  # a setting fits when its measured peak is <= (1 - HEADROOM) x budget
KILLED = (-9, 137)  # SIGKILL, usually the kernel's out-of-memory killer


@dataclass(frozen=True)
class Candidate:
    """One setting the planner may choose."""

    batch_size: int
    rank: int
    gradient_checkpointing: bool

    @property
    def label(self) -> str:
        return f"batch {self.batch_size}, rank {self.rank}, checkpointing {'on' if self.gradient_checkpointing else 'off'}"

    def overrides(self, alpha_ratio: float) -> list[str]:
        """The ``train_lora.py`` flags of this setting; alpha keeps the base config's alpha / rank ratio."""
        return ["--train.batch_size", str(self.batch_size), "--lora.rank", str(self.rank), "--lora.alpha",
                repr(float(self.rank * alpha_ratio)), "--model.gradient_checkpointing",
                str(self.gradient_checkpointing).lower()]


# Largest first: what each step gives up costs more the later it comes (speed, then batch, then capacity).
DEFAULT_LADDER = (Candidate(4, 16, False), Candidate(4, 16, True), Candidate(2, 16, True), Candidate(1, 16, True),
                  Candidate(1, 8, True))


@dataclass
class Measurement:
    """One dry run. ``status``: ``ok``, ``oom`` (does not fit), ``unread`` (finished without a readable
    report) or ``failed`` (any other error; ``detail`` holds the output's last lines)."""

    status: str
    peak_gib: float | None = None
    step_seconds: float | None = None
    detail: str = ""


@dataclass
class Plan:
    """The measured rows and the choice: ``chosen`` is None when a report could not be read (keep the
    base config); ``fits`` is False when nothing fitted (``chosen`` is then the smallest candidate)."""

    budget_gib: float
    limit_gib: float
    rows: list[tuple[Candidate, Measurement]]
    chosen: Candidate | None
    fits: bool


def read_report(returncode: int, report_path: Path, output: str = "") -> Measurement:
    """A finished dry run as a :class:`Measurement`, from its exit code and JSON report only."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = {}
    report, tail = report if isinstance(report, dict) else {}, "\n".join(output.strip().splitlines()[-15:])
    if report.get("status") == "oom" or returncode in KILLED:
        return Measurement("oom", detail=tail)
    if returncode != 0:
        return Measurement("failed", detail=tail)
    step = report.get("step_seconds_median", report.get("step_seconds"))
    try:
        step = statistics.median(step) if isinstance(step, list) else float(step)
        return Measurement("ok", float(report["peak_memory_gib"]), step)
    except (KeyError, TypeError, ValueError, statistics.StatisticsError):
        return Measurement("unread", detail=tail)


def dry_run_command(config: str | Path, c: Candidate, alpha_ratio: float, out_dir: str | Path) -> list[str]:
    """The ``train_lora.py --dry_run`` command measuring ``c``; its report goes to ``out_dir/dry_run.json``."""
    return [sys.executable, str(REPO_ROOT / "train_lora.py"), "--config", str(config), "--dry_run",
            "--dry_run_json", str(Path(out_dir) / DRY_RUN_JSON), "--train.output_dir", str(out_dir),
            *c.overrides(alpha_ratio), "--logging.progress_bar", "false"]


def subprocess_measure(config: str | Path, env: dict[str, str], alpha_ratio: float = 1.0,
                       timeout: float | None = None) -> Callable[[Candidate], Measurement]:
    """A measuring function that runs one real dry run per candidate, in ``env``."""

    def measure(c: Candidate) -> Measurement:
        with tempfile.TemporaryDirectory(prefix="midi-dry-run-") as folder:
            try:
                proc = subprocess.run(dry_run_command(config, c, alpha_ratio, folder), cwd=REPO_ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                return Measurement("failed", detail=f"the dry run took more than {timeout:g} s")
            if proc.returncode in (130, -2):
                raise KeyboardInterrupt
            return read_report(proc.returncode, Path(folder) / DRY_RUN_JSON, proc.stdout)

    return measure


def plan_settings(candidates: Sequence[Candidate], measure: Callable[[Candidate], Measurement], budget_gib: float,
                  headroom: float = HEADROOM, progress: Callable[[str], None] = print) -> Plan:
    """Measures candidates largest first and stops at the first whose peak fits ``(1 - headroom) x budget``.

    Raises:
        TrainingError: a dry run failed for another reason than memory (its output tail is included).
    """
    limit, rows = budget_gib * (1.0 - headroom), []
    for c in candidates:
        progress(f"  measuring {c.label} (train_lora.py --dry_run) ...")
        rows.append((c, m := measure(c)))
        if m.status == "failed":
            raise TrainingError(f"the dry run of {c.label} failed:", problems=m.detail.splitlines())
        if m.status == "unread":
            progress("  the dry run wrote no readable JSON report; keeping the base config's settings")
            return Plan(budget_gib, limit, rows, None, True)
        if m.status == "ok" and m.peak_gib <= limit:
            return Plan(budget_gib, limit, rows, c, True)
    return Plan(budget_gib, limit, rows, candidates[-1], False)


def format_plan(plan: Plan) -> str:
    """The measured table, with the choice marked."""
    width = max(len(c.label) for c, _ in plan.rows)
    lines = [f"  {'setting':<{width}}  {'peak memory':>12}  {'step time':>9}  fits in {plan.limit_gib:.1f} GiB "
             f"(budget {plan.budget_gib:g} GB - {1 - plan.limit_gib / plan.budget_gib:.0%} headroom)"]
    for c, m in plan.rows:
        ok = m.status == "ok"
        peak = f"{m.peak_gib:.2f} GiB" if ok else "out of memory" if m.status == "oom" else m.status
        fits = "yes" if ok and m.peak_gib <= plan.limit_gib else "no"
        mark = "  <- chosen" if c == plan.chosen and plan.fits else ""
        lines.append(f"  {c.label:<{width}}  {peak:>12}  {f'{m.step_seconds:.3f} s' if ok else '-':>9}  {fits}{mark}")
    if plan.chosen is not None and not plan.fits:
        lines.append(f"  nothing fits; the smallest setting ({plan.chosen.label}) is over the budget")
    return "\n".join(lines)
