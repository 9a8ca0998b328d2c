"""The app's web page (Gradio): inputs on the left, the base and the LoRA scene side by side.

Gradio is an optional extra (``requirements-app.txt``): it is imported at module level under a
guard, and :func:`build_demo` raises a one-line InputError naming the install command when it is
missing, so ``app.py`` reports it like any other bad start. The page only converts values and
calls :class:`midi.app.studio.Studio`; errors the user can fix become ``gr.Error`` with the
command line's one-line message (the web client shows them, not a traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from midi.app.examples import list_examples
from midi.app.studio import DOWNLOAD_FORMATS, Comparison, Settings, Studio, instance_overlay, shown_message
from midi.errors import InputError, MidiError
from midi.inference.extraction import METHODS

try:  # optional: the toolkit works without it; only the app needs it
    import gradio as gr
except ImportError:  # pragma: no cover - exercised by the tests' skip
    gr = None

logger = logging.getLogger(__name__)

INSTALL_HINT = "the app needs gradio: pip install --no-deps -r requirements-app.txt"
STAT_HEADERS = ["instance", "base vertices", "base faces", "base size", "LoRA vertices", "LoRA faces", "LoRA size",
                "note"]
NO_LORA = ""
OUTPUTS = 2 + 2 * 3 + 2 + 3  # viewers, downloads, previews, stats + status + seed


def _whole(value: float, name: str) -> int:
    """A slider's value as an int; InputError for a fraction (API callers can send anything)."""
    if value is None or float(value) != int(value):
        raise InputError(f"{name} must be a whole number, got {value}")
    return int(value)


def stat_rows(comparison: Comparison) -> list[list]:
    """One row per instance: the base side's mesh, the LoRA side's (blank without a LoRA), notes."""
    lora_rows = comparison.lora.rows if comparison.lora is not None else [[""] * 5] * len(comparison.base.rows)
    return [[b[0], *b[1:4], *lo[1:4], "; ".join(n for n in (b[4], lo[4]) if n)]
            for b, lo in zip(comparison.base.rows, lora_rows)]


def status_text(comparison: Comparison) -> str:
    """One line per side (summary, and whether it came from the cache), then the seed."""
    sides = [("base", comparison.base), ("lora", comparison.lora)]
    lines = [f"{side.summary}{' (cached)' if name in comparison.cached else ''}" for name, side in sides if side]
    return "\n\n".join(lines + [f"seed {comparison.seed}"])


def build_demo(studio: Studio, examples: Sequence[tuple[str, Path, Path]] = (), lora: str | None = None) -> gr.Blocks:
    """The page. ``examples``: ``(name, rgb, seg)`` pairs to pick from; ``lora``: the LoRA preselected."""
    if gr is None:
        raise InputError(INSTALL_HINT)
    defaults = studio.defaults
    choices = [("none (base model only)", NO_LORA)] + [(c, c) for c in studio.lora_choices()]
    if lora and lora not in [value for _, value in choices]:
        choices.append((lora, lora))

    def preview(rgb, seg):
        """The image and the map as read (instance colours = mesh colours), or the reason it cannot be read."""
        if not rgb or not seg:
            return None, "Upload an image and its instance map, or pick an example."
        try:
            scene = studio.prepare(rgb, seg)
        except MidiError as exc:
            return None, f"error: {shown_message(exc, studio.uploads)}"
        return instance_overlay(scene), f"{len(scene.names)} instances: {', '.join(scene.names)}"

    def generate(rgb, seg, lora_choice, scale, steps, guidance, seed, method, depth, smooth,
                 progress=gr.Progress(track_tqdm=True)):
        try:
            settings = Settings(_whole(steps, "steps"), float(guidance), _whole(seed, "seed"), method,
                                _whole(depth, "octree_depth"), bool(smooth))
            comparison = studio.compare(rgb, seg, lora_choice or None, float(scale), settings,
                                        lambda fraction, text: progress(fraction, desc=text))
        except MidiError as exc:
            logger.info("error: %s", exc)
            raise gr.Error(shown_message(exc, studio.uploads), print_exception=False) from None
        base, other = comparison.base, comparison.lora
        files = [str(base.files[f]) for f in DOWNLOAD_FORMATS]
        files += [str(other.files[f]) if other else None for f in DOWNLOAD_FORMATS]
        return (str(base.glb), str(other.glb) if other else None, *files, str(base.preview),
                str(other.preview) if other else None, stat_rows(comparison), status_text(comparison), comparison.seed)

    def rerun(rgb, seg, lora_choice, *settings, progress=gr.Progress(track_tqdm=True)):
        """The slider's event: nothing to redo (and no error to show) before inputs and a LoRA are set."""
        if not (rgb and seg and lora_choice):
            return tuple(gr.skip() for _ in range(OUTPUTS))
        return generate(rgb, seg, lora_choice, *settings, progress=progress)

    with gr.Blocks(title="MIDI-3D LoRA studio", analytics_enabled=False) as demo:
        gr.Markdown(f"## MIDI-3D: base model vs LoRA\n{studio.description}")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Row():
                    # type="filepath" with image_mode=None hands over the uploaded file untouched: a
                    # palette map stays a palette map, and nothing is re-encoded (lossy maps are refused).
                    rgb = gr.Image(label="RGB image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                   height=200, elem_id="rgb-file")
                    seg = gr.Image(label="instance map", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                   height=200, elem_id="seg-file")
                overlay = gr.Image(label="as read: image | instances", interactive=False, height=200)
                if examples:
                    gr.Examples([[str(r), str(s)] for _, r, s in examples], [rgb, seg],
                                example_labels=[name for name, _, _ in examples], cache_examples=False,
                                label="examples (synthetic scenes no shipped config trains on)")
                with gr.Row():
                    lora_box = gr.Dropdown(choices, value=lora or NO_LORA, allow_custom_value=True, scale=4,
                                           label="LoRA (a path, or one found under --runs)", elem_id="lora")
                    refresh = gr.Button("rescan", scale=1, size="sm")
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale (0 = base model)", elem_id="scale")
                with gr.Accordion("generation", open=False):
                    steps = gr.Slider(1, 200, value=defaults.steps, step=1, label="denoising steps")
                    guidance = gr.Slider(0.0, 15.0, value=defaults.guidance, step=0.5, label="guidance scale")
                    seed = gr.Number(value=defaults.seed, precision=0, label="seed (-1: draw one; it is then shown here)")
                with gr.Accordion("surface extraction", open=False):
                    method = gr.Radio(list(METHODS), value=defaults.method, label="extraction")
                    depth = gr.Slider(3, 10, value=defaults.octree_depth, step=1,
                                      label="octree depth ((2^depth + 1)^3 grid)")
                    smooth = gr.Checkbox(value=defaults.smooth, label="smooth the field (upstream's 3x3x3 box)")
                button = gr.Button("generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    views, downloads, previews = [], [], []
                    for side in ("base model", "LoRA"):
                        with gr.Column():
                            views.append(gr.Model3D(label=side, height=380, elem_id=f"view-{side.split()[0].lower()}",
                                                    clear_color=(0.96, 0.96, 0.96, 1.0),
                                                    camera_position=(45, 70, 4.5)))  # meshes lie in [-1, 1]^3
                            with gr.Row():
                                downloads += [gr.DownloadButton(fmt.upper(), size="sm", min_width=60) for fmt in DOWNLOAD_FORMATS]
                            previews.append(gr.Image(label=f"{side}: preview", interactive=False, height=220,
                                                     type="filepath"))
                stats = gr.Dataframe(headers=STAT_HEADERS, label="per instance", interactive=False, wrap=True)

        inputs = [rgb, seg, lora_box, scale, steps, guidance, seed, method, depth, smooth]
        outputs = [*views, *downloads, *previews, stats, status, seed]
        assert len(outputs) == OUTPUTS
        for source in (rgb, seg):
            source.change(preview, [rgb, seg], [overlay, status], api_name=False, queue=False)
        button.click(generate, inputs, outputs, api_name="generate")
        # Releasing the slider re-runs only the LoRA side: the base side comes from the studio's cache.
        scale.release(rerun, inputs, outputs, api_name=False)
        refresh.click(lambda current: gr.Dropdown(choices=[("none (base model only)", NO_LORA)] + [
            (c, c) for c in studio.lora_choices()], value=current), lora_box, lora_box, api_name=False, queue=False)
    # One job at a time: the studio holds one pipeline, and a second job would only wait for the lock.
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, *, allowed: Sequence[Path] = (), block: bool = True) -> str:
    """Serves the page on ``host:port``; returns its URL (with ``block=False``, the server runs on)."""
    demo.launch(server_name=host, server_port=port, allowed_paths=[str(p) for p in allowed], ssr_mode=False,
                prevent_thread_lock=not block, inbrowser=False, share=False, quiet=not block)
    return demo.local_url


def serve(model: str, workdir: Path, *, uploads: Path | None = None, runs: Path | None = None, lora: str | None = None,
          examples: Path | None = None, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          dtype: str = "auto") -> None:
    """Loads the model, builds the page and serves it until Ctrl-C (``app.py``'s body).

    Raises:
        InputError: gradio missing, a bad model or LoRA (before anything is served).
    """
    if gr is None:
        raise InputError(INSTALL_HINT)
    if lora is not None:
        Studio.resolve_lora(lora)  # a bad --lora fails before the (slow) model load
    studio = Studio(model, workdir, runs=runs, device=device, dtype=dtype, uploads=uploads)
    demo = build_demo(studio, list_examples(examples), lora)
    try:
        launch(demo, host, port, allowed=[examples] if examples is not None else [])
    finally:
        demo.close()  # at once: left to the interpreter's exit, the server threads take seconds
