"""The web app (``app.py``): :mod:`~midi.app.studio` is the model side (one pipeline, base-vs-LoRA
comparisons, caches, files; no web framework), :mod:`~midi.app.ui` the Gradio page over it (Gradio
is optional), :mod:`~midi.app.examples` the bundled example pairs."""
