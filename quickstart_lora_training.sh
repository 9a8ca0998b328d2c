#!/usr/bin/env bash
# Quickstart for MIDI-3D LoRA finetuning. This launcher only prepares Python: it finds Python >= 3.10,
# uses the active venv / conda env (not conda's base) or creates/reuses .venv, installs requirements.txt
# when the imports fail, then runs the wizard, python -m midi.quickstart (--help lists its flags).
# MIDI_PYTHON=/path/to/python runs the wizard with that interpreter as is (nothing installed);
# PYTHON=python3.11 picks the interpreter that creates .venv; --no_venv uses python3 on PATH.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMPORTS="import torch, diffusers, transformers, peft, accelerate, yaml, psutil, trimesh, skimage, safetensors"
NEW_VENV=""

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
on_signal() {
  trap - INT TERM
  if [[ -n $NEW_VENV ]]; then rm -rf "$NEW_VENV" && printf '\ncleaned up: removed %s\n' "$NEW_VENV"; fi
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

no_venv=0
for arg in "$@"; do [[ $arg == --no_venv ]] && no_venv=1; done
if [[ -n ${MIDI_PYTHON:-} ]]; then
  PY=$MIDI_PYTHON
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
  PY=$VIRTUAL_ENV/bin/python
elif [[ -n ${CONDA_PREFIX:-} && ${CONDA_DEFAULT_ENV:-} != base && -x $CONDA_PREFIX/bin/python ]]; then
  PY=$CONDA_PREFIX/bin/python
elif ((no_venv)); then
  PY=${PYTHON:-python3}
else
  PY=$REPO/.venv/bin/python
  if [[ ! -x $PY ]]; then
    BOOT=${PYTHON:-python3}
    python_ok "$BOOT" || die "Python >= 3.10 is needed to create .venv ($BOOT is older or missing); install 3.10 or 3.11 and run again with PYTHON=python3.11"
    echo "Creating .venv with $BOOT"
    NEW_VENV=$REPO/.venv
    "$BOOT" -m venv "$NEW_VENV" || { rm -rf "$NEW_VENV"; die "could not create .venv (on Debian/Ubuntu: apt install python3-venv)"; }
  fi
fi
python_ok "$PY" || die "Python >= 3.10 is needed; $PY is older or not runnable (set PYTHON or MIDI_PYTHON to a newer one)"
if [[ -z ${MIDI_PYTHON:-} ]] && ! "$PY" -c "$IMPORTS" 2>/dev/null; then
  echo "Installing requirements.txt for $PY (torch and friends: a few GB). For a GPU outside Linux, install a CUDA build of torch first (README.md)."
  if ! "$PY" -m pip install -r "$REPO/requirements.txt"; then
    [[ -z $NEW_VENV ]] || rm -rf "$NEW_VENV"
    die "pip install failed (see above); fix it and run again"
  fi
fi
trap - INT TERM
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m midi.quickstart "$@"
