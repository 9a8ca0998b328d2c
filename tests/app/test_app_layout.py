"""The app keeps the toolkit's layout rules (tests/test_architecture.py's checks, applied to its files):
no import cycles, imports inside functions only for app.py's one deferred import, modules <= 500 lines."""

from __future__ import annotations

import test_architecture as arch

APP_FILES = sorted(p.relative_to(arch.REPO).as_posix() for p in (arch.REPO / "midi" / "app").glob("*.py")) + ["app.py"]


def test_no_import_cycles_through_the_app():
    assert [c for c in arch.import_cycles() if any(m.startswith("midi.app") for m in c)] == []


def test_only_app_py_defers_one_import():
    # app.py imports the Gradio page after setting GRADIO_TEMP_DIR (Gradio reads it at import time).
    found = [hit for rel in APP_FILES for hit in arch.function_level_imports(rel)]
    assert len(found) == 1 and found[0].startswith("app.py:") and found[0].endswith("in main(): midi.app")


def test_modules_are_small():
    sizes = {rel: len((arch.REPO / rel).read_text().splitlines()) for rel in APP_FILES}
    assert {rel: n for rel, n in sizes.items() if n > 500} == {}
    assert sizes["app.py"] <= 100  # the script stays thin: parse, then midi.app.ui.serve
