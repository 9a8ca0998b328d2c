"""Constants shared by the app's test modules (imported by name: tests/app is on sys.path)."""

from __future__ import annotations

from midi.app.studio import Settings

GRADIO_MISSING = "gradio is not installed (optional extra: pip install --no-deps -r requirements-app.txt)"
FAST = Settings(steps=2, guidance=7.0, seed=42, method="dense", octree_depth=4)  # every instance still meshes
SMALL = "synthetic_00102"  # the bundled example with the fewest instances (2)
