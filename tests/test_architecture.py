"""The layout rules of the redesign (issue 10), checked on the source, one set of cases per area.

- no import cycles among ``midi.*`` (function-level imports count; ``if TYPE_CHECKING:`` does not);
- imports inside functions only for optional packages, plus the one deferred import of each CLI
  (its fast-fail config check must not import torch);
- modules of at most 500 lines (train_lora.py 350, the bash wizard 60);
- one home: the ``"tiny"`` literal only in midi/config.py (and demo.py's argv), the download hint
  only once in midi/, no ruff-format skip markers anywhere.

Each area's package makes its own cases pass; an area that is not redesigned yet is xfail (not
strict), so the suite stays green while the packages land one by one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Areas by path prefix (first match wins); each package owns one.
AREAS = {
    "core": ("midi/errors.py", "midi/config.py", "midi/config_load.py", "midi/tiny.py", "midi/data/atomic.py",
             "midi/data/images.py", "midi/__init__.py"),
    "inference": ("midi/inference", "midi/extraction.py", "midi/mesh.py", "inference_with_lora.py"),
    "training": ("midi/training", "midi/train_", "midi/trainer.py", "train_lora.py"),
    "data": ("midi/data/", "prepare_data.py"),
    "wizard": ("midi/quickstart.py", "midi/memory_plan.py", "quickstart_lora_training.sh", "demo.py", "midi/lora.py",
               "midi/models/", "midi/pipelines/", "midi/loaders/", "midi/schedulers/"),
}
# Areas not redesigned yet (their cases xfail); empty since every area landed.
PENDING: dict[str, str] = {}
# Separate features, checked by their own owners.
OTHER = ("midi/evaluation/", "midi/mini/", "evaluate.py")

SCRIPTS = ("train_lora.py", "inference_with_lora.py", "prepare_data.py", "demo.py")
OPTIONAL_MODULES = {"bitsandbytes", "trimesh.ray.ray_pyembree", "wandb"}
# One deferred import per CLI: after the config check, so a bad config fails without torch.
CLI_DEFERRED = {("train_lora.py", "main"), ("inference_with_lora.py", "main"),
                ("prepare_data.py", "run_check")}  # --check --vae: torch and the models only when asked
# Declared deferred imports of the torch-free core: torch only for an fp16 config (the config check
# must stay torch-free).
DECLARED_DEFERRED = {("midi/config_load.py", "training_device_is_cpu")}
FMT_SKIP = "# fmt" + ": skip"  # spelled in two parts, so this file has no marker either
MAX_LINES = {"train_lora.py": 350, "quickstart_lora_training.sh": 60}


def area_of(rel: str) -> str | None:
    if rel.startswith(OTHER):
        return None
    return next((area for area, prefixes in AREAS.items() if rel.startswith(prefixes)), None)


def source_files(ext: str = ".py") -> list[str]:
    files = [p.relative_to(REPO).as_posix() for p in (REPO / "midi").rglob(f"*{ext}")]
    files += [s for s in (*SCRIPTS, "quickstart_lora_training.sh") if s.endswith(ext) and (REPO / s).is_file()]
    return sorted(files)


def module_name(rel: str) -> str:
    parts = Path(rel).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def _imported(rel: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module_name(rel).split(".")
        if not rel.endswith("__init__.py"):
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(rel): rel for rel in source_files() if rel.startswith("midi/")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, rel in modules.items():
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip:
                graph[name] |= {t for t in _imported(rel, node) if t in modules and t != name}
    return graph


def import_cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def function_level_imports(rel: str) -> list[str]:
    tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        nested = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
        deferred_allowed = (rel, fn.name) in CLI_DEFERRED | DECLARED_DEFERRED
        for node in nested:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if all(n in OPTIONAL_MODULES for n in names):
                continue
            if deferred_allowed:
                deferred_allowed = False  # exactly one
                continue
            found.append(f"{rel}:{node.lineno} in {fn.name}(): {', '.join(names)}")
    return sorted(set(found))


def files_of(area: str, ext: str = ".py") -> list[str]:
    return [rel for rel in source_files(ext) if area_of(rel) == area]


def by_area(test):
    """Parametrises a check over the areas; pending areas are xfail until their package lands."""
    params = [pytest.param(area, marks=pytest.mark.xfail(reason=f"not redesigned yet ({PENDING[area]})",
                                                         strict=False))
              if area in PENDING else area for area in AREAS]
    return pytest.mark.parametrize("area", params)(test)


@by_area
def test_no_import_cycles(area):
    mine = {module_name(rel) for rel in files_of(area) if rel.startswith("midi/")}
    assert [c for c in import_cycles() if mine & set(c)] == []


@by_area
def test_function_level_imports_only_optional(area):
    assert [hit for rel in files_of(area) for hit in function_level_imports(rel)] == []


@by_area
def test_module_size(area):
    too_long = []
    for rel in files_of(area) + files_of(area, ".sh"):
        lines = len((REPO / rel).read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES.get(rel, 500):
            too_long.append(f"{rel}: {lines} lines > {MAX_LINES.get(rel, 500)}")
    assert too_long == []


@by_area
def test_one_home(area):
    problems = []
    for rel in files_of(area) + files_of(area, ".sh"):
        text = (REPO / rel).read_text(encoding="utf-8")
        if FMT_SKIP in text:
            problems.append(f"{rel}: {FMT_SKIP}")
        if rel.endswith(".py") and rel not in ("midi/config.py", "demo.py"):
            strings = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and n.value == "tiny"]
            problems += [f"{rel}:{n.lineno}: the 'tiny' literal (use midi.config.is_tiny / TINY_MODEL)" for n in strings]
        if rel.startswith("midi/") and rel != "midi/config.py" and re.search(r"hf download", text):
            problems.append(f"{rel}: spells out the download command (use midi.config.DOWNLOAD_HINT)")
    assert problems == []


def test_the_checker_sees_cycles_through_function_level_imports(tmp_path, monkeypatch):
    (tmp_path / "midi").mkdir()
    (tmp_path / "midi" / "a.py").write_text("import midi.b\n")
    (tmp_path / "midi" / "b.py").write_text("def f():\n    from midi import a\n")
    (tmp_path / "midi" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import midi.a\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert import_cycles() == [["midi.a", "midi.b"]]
    assert function_level_imports("midi/b.py") == ["midi/b.py:2 in f(): midi"]
