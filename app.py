#!/usr/bin/env python
"""A web page to try a LoRA on an image: the base model's scene and the LoRA's side by side, in 3D.

Examples::

    python app.py --model tiny                                  # CPU demo; LoRAs listed from outputs/
    python app.py --model pretrained_weights/MIDI-3D --runs outputs --lora outputs/my-run
    python app.py --model tiny --host 0.0.0.0 --port 7861       # reachable from other machines

Needs the optional extra: ``pip install --no-deps -r requirements-app.txt``. Uploads and results
stay in one temporary folder, removed when the server stops. Binds 127.0.0.1 unless ``--host``
(or ``GRADIO_SERVER_NAME``, which Hugging Face Spaces sets) says otherwise. Bad options print one
``error:`` line and exit with status 2, as ``inference_with_lora.py`` does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from midi.app.examples import EXAMPLES_DIR
from midi.config import DEFAULT_MODEL_DIR, check_model_path
from midi.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR,
                   help="base model: a MIDI-3D pipeline folder (e.g. models/midi-mini) or 'tiny' (small random model)")
    p.add_argument("--runs", type=Path, default=Path("outputs"), help="folder searched for LoRAs to offer")
    p.add_argument("--lora", default=None, help="LoRA preselected on the page (any format inference_with_lora.py takes)")
    p.add_argument("--examples", type=Path, default=EXAMPLES_DIR, help="folder of X_rgb.png / X_seg.png example pairs")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    return p.parse_args(argv)


def _exit_on_sigterm(*_) -> None:
    """`kill` ends the app like Ctrl-C does, through the clean-up in main (Python's default would skip it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    sys.exit(143)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)  # before torch and Gradio load (seconds)
    workdir = Path(tempfile.mkdtemp(prefix="midi-app-"))
    # Gradio reads its file folder from this variable, partly at import: set it first, so every
    # upload and every copy Gradio makes lands in our temporary folder.
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "uploads")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        from midi.app import ui  # deferred: after GRADIO_TEMP_DIR, and bad options fail before the imports

        ui.serve(args.model, workdir, uploads=workdir / "uploads", runs=args.runs, lora=args.lora,
                 examples=args.examples, host=args.host, port=args.port, device=args.device, dtype=args.dtype)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
