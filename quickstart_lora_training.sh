#!/usr/bin/env bash
# Interactive setup of a MIDI-3D LoRA finetuning run: environment, model, data, GPUs, memory plan,
# config, command, training. The prompts and the flow live here; the logic lives in midi/quickstart.py
# (python -m midi.quickstart --help). Run with --help for the flags.
# Works with bash 3.2 (macOS) and newer.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ORIG_PWD="$PWD"
cd "$REPO"

usage() {
  cat <<'EOF'
Usage: bash quickstart_lora_training.sh [options]

Sets up a LoRA finetuning run of MIDI-3D step by step and (optionally) starts it:
  1. Python environment: the active venv / conda env, or .venv with the pinned requirements
  2. environment report: Python, dependencies, torch/CUDA, GPUs, RAM, disk
  3. base model: pretrained_weights/MIDI-3D (or another pipeline folder), or 'tiny' (embedded demo)
  4. run name: everything goes to runs/<name>/
  5. data: a prepared dataset or a 3D-Front root (checked), raw meshes (prepared into
     <folder>_prepared, then checked), or 'synthetic' (generated demo scenes in runs/<name>/data)
  6. GPUs (0 = CPU): writes runs/<name>/accelerate.yaml
  7. memory budget: dry runs pick batch size, gradient checkpointing and LoRA rank that fit
  8. writes runs/<name>/config.yaml and runs/<name>/train.sh, prints the training command, starts it

Every question shows its default in [brackets]; Enter accepts it.

Options (each answers its question; with --yes nothing is asked):
  --model DIR|tiny    base model: a MIDI-3D pipeline folder (with model_index.json) or 'tiny'
  --data DIR|synthetic
                      training data: prepared dataset, 3D-Front root, raw meshes, or 'synthetic'
  --num_synthetic N   synthetic scenes to generate (default 8)
  --gpus N            GPUs to train on (default: all visible; 0 = CPU)
  --memory_gb X       memory budget per process in GB (default: the GPU's memory, or 80% of the
                      available RAM on the CPU); the plan keeps 10% headroom
  --name NAME         run name (default tiny-lora / midi-lora, numbered when taken)
  --runs_dir DIR      where run folders go (default runs/ in the repository)
  --max_steps N       train.max_steps for a quick run (default: the base config's)
  --no_measure        skip the dry runs; keep the base config's batch size, rank, checkpointing
  --no_venv           use the current interpreter (active venv / conda env / python3) as is
  --no_train          stop after writing the config and printing the command
  -y, --yes           accept every default (non-interactive)
  -h, --help          this help

Environment: MIDI_PYTHON=/path/to/python uses that interpreter (no venv step); PYTHON=python3.11
picks the interpreter that creates .venv.

Ctrl-C at any point before training starts removes what this invocation created (the run folder,
a new .venv) and exits with 130 (143 for SIGTERM). Files are written under temporary names and
renamed, so no half-written file is ever left.

Examples:
  bash quickstart_lora_training.sh
  bash quickstart_lora_training.sh --yes --model tiny --data synthetic --gpus 0 --max_steps 20
  bash quickstart_lora_training.sh --model pretrained_weights/MIDI-3D --data data/raw_scenes --gpus 4
EOF
}

# ----------------------------------------------------------------------------- output helpers
say() { printf '%s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  local code=$1
  shift
  printf 'error: %s\n' "$*" >&2
  exit "$code"
}
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
trim() {
  local s=$1
  s="${s#"${s%%[![:space:]]*}"}"
  s="${s%"${s##*[![:space:]]}"}"
  printf '%s' "$s"
}
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
int_at_least() { is_int "$1" && ((10#$1 >= $2)); } # VALUE MIN
is_positive_number() { [[ $1 =~ ^[0-9]*\.?[0-9]+$ && ! $1 =~ ^0*\.?0*$ ]]; }

# Prints the command (shell-quoted), then runs it.
run() {
  local shown
  shown=$(printf '%q ' "$@")
  say "\$ ${shown% }"
  "$@"
}

# kv KEY TEXT: the value of a "KEY=value" line of TEXT.
kv() {
  local line
  while IFS= read -r line; do
    if [[ $line == "$1="* ]]; then
      printf '%s' "${line#*=}"
      return 0
    fi
  done <<<"$2"
  return 1
}

# A path answered by the user, relative to where the script was started (defaults shown in the
# questions are relative to the repository, the working directory, and are used as they are).
user_path() {
  local p=$1
  case $p in
    \~) p=$HOME ;;
    \~/*) p="$HOME/${p#\~/}" ;;
  esac
  if [[ $p != /* ]]; then
    p="$ORIG_PWD/$p"
  fi
  printf '%s' "$p"
}

# ----------------------------------------------------------------------------- questions
ASSUME_YES=0

# ask VAR QUESTION DEFAULT [SHOWN]: sets VAR to the answer (Enter = DEFAULT; --yes answers DEFAULT).
# SHOWN is what the brackets show (default: DEFAULT).
ask() {
  # Locals are prefixed: printf -v must not hit a local of this function named like the caller's variable.
  local _ask_var=$1 _ask_question=$2 _ask_default=$3 _ask_shown=${4:-$3} _ask_reply=""
  if ((ASSUME_YES)); then
    say "$_ask_question [$_ask_shown]: $_ask_default"
  else
    printf '%s [%s]: ' "$_ask_question" "$_ask_shown"
    if ! IFS= read -r _ask_reply; then
      printf '\n'
      die 2 "no answer to \"$_ask_question\" (input closed); use --yes or give the values as flags (--help)"
    fi
    _ask_reply=$(trim "$_ask_reply")
  fi
  printf -v "$_ask_var" '%s' "${_ask_reply:-$_ask_default}"
}

# ask_yes_no QUESTION y|n: returns 0 for yes.
ask_yes_no() {
  local question=$1 default=$2 shown="y/N" answer
  [[ $default == y ]] && shown="Y/n"
  while true; do
    ask answer "$question" "$default" "$shown"
    case $(lower "$answer") in
      y | yes) return 0 ;;
      n | no) return 1 ;;
      *) say "  please answer y or n" ;;
    esac
  done
}

# Flag given or --yes: a bad answer cannot be asked again.
non_interactive() { ((ASSUME_YES)) || [[ -n ${1:-} ]]; }

# ----------------------------------------------------------------------------- cleanup on Ctrl-C
CLEANUP=()    # paths created by this invocation, removed unless the wizard finishes
TRAINING=0
RUN_DIR=""

register_cleanup() { CLEANUP+=("$1"); }

cleanup() {
  local i p
  for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do
    p=${CLEANUP[i]}
    if [[ -n $p && -e $p ]]; then
      rm -rf -- "$p"
      say "cleaned up: removed $p (created by this invocation, unfinished)"
    fi
  done
  CLEANUP=()
}

on_signal() {
  local code=130
  [[ $1 == TERM ]] && code=143
  trap - INT TERM
  printf '\n'
  if ((TRAINING)); then
    say "training interrupted; the run folder is kept. Continue with:"
    say "  bash $RUN_DIR/train.sh --resume_from_checkpoint latest"
  else
    say "interrupted ($1): nothing half-done is left behind"
    cleanup
  fi
  exit "$code"
}

on_exit() {
  local rc=$?
  if ((rc != 0 && ${#CLEANUP[@]} > 0)); then
    say "stopped before the end (exit code $rc)"
    cleanup
  fi
}

trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap on_exit EXIT

# ----------------------------------------------------------------------------- options
OPT_MODEL="" OPT_DATA="" OPT_GPUS="" OPT_MEMORY="" OPT_NAME="" OPT_STEPS="" OPT_SYNTHETIC=""
RUNS_DIR="runs"    # relative to the repository (the working directory from here on)
NO_VENV=0 NO_TRAIN=0 NO_MEASURE=0

parse_args() {
  local arg val has_val
  while (($#)); do
    arg=$1 val="" has_val=0
    if [[ $arg == --*=* ]]; then
      val=${arg#*=} arg=${arg%%=*} has_val=1
    fi
    case $arg in
      --model | --data | --gpus | --memory_gb | --name | --runs_dir | --max_steps | --num_synthetic)
        if ((!has_val)); then
          (($# >= 2)) || die 2 "$arg needs a value (see --help)"
          val=$2
          shift
        fi
        [[ -n $val ]] || die 2 "$arg needs a non-empty value"
        ;;
      *) ((!has_val)) || die 2 "$arg takes no value" ;;
    esac
    case $arg in
      -h | --help) usage; exit 0 ;;
      -y | --yes) ASSUME_YES=1 ;;
      --model) OPT_MODEL=$val ;;
      --data) OPT_DATA=$val ;;
      --gpus) is_int "$val" || die 2 "--gpus needs a whole number >= 0, got '$val'"; OPT_GPUS=$val ;;
      --memory_gb) is_positive_number "$val" || die 2 "--memory_gb needs a number > 0, got '$val'"; OPT_MEMORY=$val ;;
      --name) OPT_NAME=$val ;;
      --runs_dir) RUNS_DIR=$(user_path "$val") ;;
      --max_steps) int_at_least "$val" 1 || die 2 "--max_steps needs a whole number >= 1, got '$val'"; OPT_STEPS=$val ;;
      --num_synthetic) int_at_least "$val" 2 || die 2 "--num_synthetic needs a whole number >= 2, got '$val'"; OPT_SYNTHETIC=$val ;;
      --no_venv) NO_VENV=1 ;;
      --no_train) NO_TRAIN=1 ;;
      --no_measure) NO_MEASURE=1 ;;
      *) die 2 "unknown option '$arg' (see --help)" ;;
    esac
    shift
  done
}

# ----------------------------------------------------------------------------- 1. Python
PY=""

qs() { "$PY" -m midi.quickstart "$@"; }

python_version_ok() { # PYTHON -> prints the version; 0 when >= 3.10
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}

require_python() { # PYTHON
  local v
  if ! v=$(python_version_ok "$1"); then
    die 1 "Python >= 3.10 is needed; $1 is ${v:-not runnable}. Install Python 3.10 or 3.11 (e.g. from python.org, pyenv or conda) and run again with PYTHON=python3.11"
  fi
  say "Python $v ($1)"
}

absolute_exe() { # NAME_OR_PATH -> absolute path
  local p=$1
  if [[ $p != */* ]]; then
    p=$(command -v "$p") || die 1 "'$1' not found on PATH"
  fi
  [[ $p == /* ]] || p="$ORIG_PWD/$p"
  printf '%s' "$p"
}

install_requirements() { # PYTHON: into an existing environment
  if ! run "$1" -m pip install -r requirements.txt; then
    die 1 "pip install failed (see above); fix it and run again"
  fi
}

use_existing_env() { # PYTHON DESCRIPTION
  PY=$(absolute_exe "$1")
  require_python "$PY"
  if ! qs deps; then
    say "Some pinned requirements are missing in $2."
    if ask_yes_no "Install requirements.txt into it with pip?" y; then
      install_requirements "$PY"
    else
      die 1 "missing requirements; install them with: $PY -m pip install -r requirements.txt"
    fi
  fi
}

setup_repo_venv() {
  local stamp boot question
  stamp=".venv/.installed-$(cksum requirements.txt | cut -d' ' -f1)"
  if [[ -x .venv/bin/python && -f $stamp ]]; then
    say "Using .venv (requirements.txt already installed)."
    PY="$REPO/.venv/bin/python"
    require_python "$PY"
    return
  fi
  boot=${PYTHON:-python3}
  command -v "$boot" >/dev/null || die 1 "$boot not found; install Python 3.10 or 3.11, or set PYTHON=/path/to/python3"
  require_python "$(absolute_exe "$boot")"
  say "On a GPU machine, torch from PyPI is a CUDA build on Linux; elsewhere see README.md for the CUDA build."
  if [[ -x .venv/bin/python ]]; then
    question="Install the pinned requirements into the existing .venv?"
  else
    question="Create .venv and install the pinned requirements (torch and friends: a few GB)?"
  fi
  if ! ask_yes_no "$question" y; then
    PY=$(absolute_exe "$boot")
    warn "no venv: using $PY as it is"
    qs deps || die 1 "missing requirements for $PY; install them with: $PY -m pip install -r requirements.txt"
    return
  fi
  if [[ ! -e .venv ]]; then
    register_cleanup "$REPO/.venv"
    run "$boot" -m venv .venv || die 1 "could not create .venv (on Debian/Ubuntu: apt install python3-venv)"
  fi
  install_requirements .venv/bin/python
  rm -f .venv/.installed-*
  : >"$stamp"
  CLEANUP=()    # .venv is complete now: keep it whatever happens next
  PY="$REPO/.venv/bin/python"
}

setup_python() {
  section "1/8 Python environment"
  if [[ -n ${MIDI_PYTHON:-} ]]; then
    say "MIDI_PYTHON is set: using it as is."
    PY=$(absolute_exe "$MIDI_PYTHON")
    require_python "$PY"
    return
  fi
  if ((NO_VENV)); then
    if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
      use_existing_env "$VIRTUAL_ENV/bin/python" "the active venv"
    elif [[ -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then
      use_existing_env "$CONDA_PREFIX/bin/python" "the active conda env"
    else
      use_existing_env "${PYTHON:-python3}" "this Python"
    fi
    return
  fi
  if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python && $VIRTUAL_ENV != "$REPO/.venv" ]]; then
    if ask_yes_no "A virtual environment is active ($VIRTUAL_ENV). Use it?" y; then
      use_existing_env "$VIRTUAL_ENV/bin/python" "the active venv"
      return
    fi
  elif [[ -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then
    local default=y
    if [[ ${CONDA_DEFAULT_ENV:-} == base ]]; then
      default=n    # installing the pins into conda's base env would change it for everything else
      say "(the conda base env is active; a separate environment is safer, so the default is no)"
    fi
    if ask_yes_no "A conda environment is active (${CONDA_DEFAULT_ENV:-$CONDA_PREFIX}). Use it?" "$default"; then
      use_existing_env "$CONDA_PREFIX/bin/python" "the active conda env"
      return
    fi
  fi
  setup_repo_venv
}

# ----------------------------------------------------------------------------- 2. doctor
GPUS_VISIBLE=0 GPU_MEMORY=0 CPU_BUDGET=4

run_doctor() {
  section "2/8 Environment check"
  local out rc=0
  out=$(qs doctor) || rc=$?
  if ((rc != 0)); then
    die 1 "the environment check failed (the [FAIL] lines above say how to fix it)"
  fi
  GPUS_VISIBLE=$(kv gpus "$out")
  GPU_MEMORY=$(kv gpu_memory_gb "$out")
  CPU_BUDGET=$(kv cpu_budget_gb "$out")
}

# ----------------------------------------------------------------------------- 3. model
MODEL="" BASE_CONFIG="" TINY=0

choose_model() {
  section "3/8 Base model"
  local default answer out
  default=$(qs default-model)
  if [[ -z $OPT_MODEL ]]; then
    say "The LoRA is trained on top of a MIDI-3D pipeline folder (with model_index.json), or on 'tiny':"
    say "an embedded toy model that trains on a laptop CPU in a minute (to try the tools; it learns nothing useful)."
    if [[ $default == tiny ]]; then
      say "No weights in pretrained_weights/MIDI-3D yet. To get the real model:"
      say "  hf download VAST-AI/MIDI-3D --local-dir pretrained_weights/MIDI-3D"
    fi
  fi
  while true; do
    if [[ -n $OPT_MODEL ]]; then
      answer=$OPT_MODEL
      say "base model: $answer (--model)"
    else
      ask answer "Base model folder, or 'tiny'" "$default"
    fi
    [[ $(lower "$answer") == tiny || $answer == "$default" ]] || answer=$(user_path "$answer")
    if out=$(qs check-model "$answer"); then
      break
    fi
    non_interactive "$OPT_MODEL" && exit 2
    say "  (try again)"
  done
  MODEL=$(kv model "$out")
  BASE_CONFIG=$(kv base_config "$out")
  TINY=$(kv tiny "$out")
  say "base model: $MODEL; the run starts from $BASE_CONFIG"
}

# ----------------------------------------------------------------------------- 4. run name
NAME=""

choose_name() {
  section "4/8 Run name"
  local suggestion answer
  suggestion=$(qs run-name --runs-dir "$RUNS_DIR" --model "$MODEL")
  while true; do
    if [[ -n $OPT_NAME ]]; then
      answer=$OPT_NAME
    else
      ask answer "Run name (its folder: $RUNS_DIR/<name>)" "$suggestion"
    fi
    if NAME=$(qs run-name --runs-dir "$RUNS_DIR" --name "$answer"); then
      break
    fi
    non_interactive "$OPT_NAME" && exit 2
  done
  if [[ ! -d $RUNS_DIR ]]; then
    mkdir -p "$RUNS_DIR"
    register_cleanup "$RUNS_DIR"
  fi
  RUN_DIR="$RUNS_DIR/$NAME"
  mkdir "$RUN_DIR" || die 1 "could not create $RUN_DIR"
  register_cleanup "$RUN_DIR"
  say "run folder: $RUN_DIR (removed again if the wizard stops before the end)"
}

# ----------------------------------------------------------------------------- 5. data
DATA=""

# check_data DIR: prepare_data.py --check; 0 when the data can be used.
check_data() {
  local rc=0
  run "$PY" prepare_data.py --check "$1" --report_dir "$RUN_DIR/data-check" || rc=$?
  if ((rc == 0)); then
    say "data check passed (contact sheet of the scenes: $RUN_DIR/data-check/contact_sheet.png)"
    return 0
  fi
  if ((rc == 1)); then
    warn "the check found errors in $1 (see above and $RUN_DIR/data-check/check_report.json)"
    ask_yes_no "Use this data anyway?" n && return 0
  fi
  return 1
}

config_value() { qs config-value --config "$BASE_CONFIG" "$1"; }

make_synthetic() {
  local n dir="$RUN_DIR/data" rc=0
  if [[ -n $OPT_SYNTHETIC ]]; then
    n=$OPT_SYNTHETIC
  else
    while true; do
      ask n "How many synthetic scenes?" 8
      int_at_least "$n" 2 && break
      say "  a whole number >= 2 (one scene at least goes to validation)"
      ((ASSUME_YES)) && exit 2
    done
  fi
  say "Generating $n synthetic scenes (primitives on a floor, rendered with instance maps) into $dir"
  run "$PY" prepare_data.py --synthetic "$n" --output_dir "$dir" --image_size "$(config_value data.image_size)" \
    --num_samples "$(config_value data.num_surface_points)" || rc=$?
  ((rc == 0)) || die 1 "prepare_data.py --synthetic failed (exit code $rc)"
  check_data "$dir" || return 1
  DATA=$dir
}

prepare_raw() { # RAW_DIR PREPARED_DIR
  local rc=0
  say "Preparing $1 into $2 (re-running skips finished scenes; Ctrl-C keeps the finished ones for next time)"
  run "$PY" prepare_data.py --input_dir "$1" --output_dir "$2" --image_size "$(config_value data.image_size)" \
    --num_samples "$(config_value data.num_surface_points)" || rc=$?
  if ((rc <= 1)) && [[ $(kv scenes "$(qs detect-data "$2" 2>/dev/null)") == 0 ]]; then
    warn "prepare_data.py wrote no scene from $1 (every scene was skipped, reasons above); fix the inputs or give other data"
    return 1
  fi
  if ((rc == 1)); then
    warn "some scenes were skipped (reasons above); continuing with the others"
  elif ((rc != 0)); then
    return 1
  fi
  check_data "$2" || return 1
  DATA=$2
}

choose_data() {
  section "5/8 Training data"
  local default answer out kind prepared
  if ((TINY == 0)) && [[ -f data/midi-scenes/manifest.json ]]; then
    default=data/midi-scenes
  else
    default=synthetic
  fi
  if [[ -z $OPT_DATA ]]; then
    say "Give one of: a prepared dataset (prepare_data.py output, with manifest.json); a 3D-Front root;"
    say "a folder of raw meshes (one subfolder per scene with .obj/.glb/.gltf/.ply/.stl/.off files, optionally"
    say "images + instance id maps); or 'synthetic' for generated demo scenes (a smoke test, not real training)."
  fi
  while true; do
    if [[ -n $OPT_DATA ]]; then
      answer=$OPT_DATA
      say "data: $answer (--data)"
    else
      ask answer "Data folder, or 'synthetic'" "$default"
    fi
    if [[ $(lower "$answer") == synthetic ]]; then
      make_synthetic && return 0
    else
      [[ $answer == "$default" ]] || answer=$(user_path "$answer")
      out=$(qs detect-data "$answer")
      kind=$(kv kind "$out")
      case $kind in
        prepared | 3d-front)
          if check_data "$answer"; then
            DATA=$answer
            return 0
          fi
          ;;
        raw)
          prepared=$(kv prepared_dir "$out")
          if ask_yes_no "Prepare these meshes into $prepared with prepare_data.py?" y; then
            prepare_raw "$answer" "$prepared" && return 0
          else
            say "  then give a prepared dataset instead"
          fi
          ;;
        *) ;; # detect-data said why
      esac
    fi
    non_interactive "$OPT_DATA" && die 2 "no usable training data (see above)"
  done
}

# ----------------------------------------------------------------------------- 6. GPUs
GPUS=0

choose_gpus() {
  section "6/8 GPUs"
  local answer
  if ((GPUS_VISIBLE == 0)); then
    say "No GPU visible: 0 = train on the CPU."
  else
    say "$GPUS_VISIBLE GPU(s) visible. 1 = plain python; 2 or more = data-parallel with accelerate (DDP)."
  fi
  while true; do
    if [[ -n $OPT_GPUS ]]; then
      answer=$OPT_GPUS
      say "GPUs: $answer (--gpus)"
    else
      ask answer "How many GPUs to train on (0 = CPU)" "$GPUS_VISIBLE"
    fi
    if is_int "$answer" && ((10#$answer <= GPUS_VISIBLE)); then
      break
    fi
    if ((GPUS_VISIBLE == 0)); then
      say "  torch sees no GPU here, so 0 (the CPU) is the only choice"
    else
      say "  a whole number from 0 to $GPUS_VISIBLE (the GPUs torch sees)"
    fi
    non_interactive "$OPT_GPUS" && exit 2
  done
  GPUS=$((10#$answer))
  if ((GPUS == 0 && TINY == 0)); then
    warn "the real MIDI-3D model on the CPU is very slow (a training step takes minutes); fine for a smoke test only"
  fi
  qs write-accelerate --gpus "$GPUS" --visible-gpus "$GPUS_VISIBLE" --out "$RUN_DIR/accelerate.yaml"
  say "wrote $RUN_DIR/accelerate.yaml"
}

# ----------------------------------------------------------------------------- 7. config + memory plan
MEMORY=""

write_config() { # extra write-config arguments...
  local args=(--base "$BASE_CONFIG" --out "$RUN_DIR/config.yaml" --model "$MODEL" --data-root "$DATA"
    --output-dir "$RUN_DIR" --note "run $NAME, from $BASE_CONFIG")
  [[ -n $OPT_STEPS ]] && args+=(--max-steps "$OPT_STEPS")
  qs write-config "${args[@]}" "$@" || die 2 "the config is not valid (see above)"
}

plan_memory() {
  section "7/8 Memory plan"
  local default answer out rc=0
  if ((GPUS > 0)); then default=$GPU_MEMORY; else default=$CPU_BUDGET; fi
  write_config
  if ((NO_MEASURE)); then
    say "Skipping the dry runs (--no_measure): keeping the batch size, LoRA rank and checkpointing of $BASE_CONFIG."
    return
  fi
  say "A few dry runs (train_lora.py --dry_run: builds the model and times real steps) pick the largest"
  say "batch size / LoRA rank / checkpointing setting whose peak memory fits the budget with 10% headroom."
  if ((TINY)); then
    say "Each dry run takes about half a minute with the tiny model."
  else
    say "Each dry run loads the real weights: a few minutes each, at most 5 (--no_measure skips them)."
  fi
  while true; do
    if [[ -n $OPT_MEMORY ]]; then
      answer=$OPT_MEMORY
      say "memory budget: $answer GB (--memory_gb)"
    else
      ask answer "Memory budget per process in GB ($([[ $GPUS -gt 0 ]] && echo "GPU memory" || echo "RAM"))" "$default"
    fi
    is_positive_number "$answer" && break
    say "  a number of GB > 0, e.g. 24"
    non_interactive "$OPT_MEMORY" && exit 2
  done
  MEMORY=$answer
  out=$(qs plan --config "$RUN_DIR/config.yaml" --budget-gb "$MEMORY" --gpus "$GPUS" --write \
    --note "run $NAME, from $BASE_CONFIG") || rc=$?
  if ((rc == 3)); then
    say "No setting fits in $MEMORY GB. Options: more memory (a bigger GPU, or more RAM), fewer instances per"
    say "scene (data.max_num_instances) or smaller images (data.image_size) in $RUN_DIR/config.yaml."
    if ask_yes_no "Use the smallest setting anyway (it may run out of memory)?" n; then
      write_config --batch-size "$(kv batch_size "$out")" --rank "$(kv rank "$out")" \
        --gradient-checkpointing "$(kv gradient_checkpointing "$out")"
    else
      die 1 "no setting fits the memory budget"
    fi
  elif ((rc != 0)); then
    die 1 "the memory plan failed (see above)"
  fi
}

# ----------------------------------------------------------------------------- 8. command + training
start_training() {
  section "8/8 Ready"
  local cmd rc=0
  cmd=$(qs command --config "$RUN_DIR/config.yaml" --gpus "$GPUS" --visible-gpus "$GPUS_VISIBLE" --python "$PY" \
    --accelerate-config "$RUN_DIR/accelerate.yaml" --script "$RUN_DIR/train.sh")
  CLEANUP=()    # the run folder is complete: nothing is removed from here on
  say "run folder: $RUN_DIR"
  say "  config.yaml      the training config (validated; every key documented)"
  say "  accelerate.yaml  the accelerate launch config"
  say "  train.sh         the command below; add --resume_from_checkpoint latest to continue a stopped run"
  say "Training command (run it from $REPO):"
  say "  $cmd"
  if ((NO_TRAIN)); then
    say "Not starting training (--no_train)."
    return 0
  fi
  if ! ask_yes_no "Start training now?" y; then
    say "Not started; run the command above when you are ready."
    return 0
  fi
  TRAINING=1
  bash -c "$cmd" || rc=$?
  TRAINING=0
  if ((rc != 0)); then
    die "$rc" "training stopped with exit code $rc (see above); continue it with: bash $RUN_DIR/train.sh --resume_from_checkpoint latest"
  fi
  say "Training finished: the adapter is in $RUN_DIR/lora-final (inference: see README.md)."
}

main() {
  parse_args "$@"
  say "MIDI-3D LoRA quickstart: sets up a finetuning run in 8 steps."
  say "Every question shows its default in [brackets]; press Enter to accept it. Ctrl-C stops and cleans up."
  setup_python
  run_doctor
  choose_model
  choose_name
  choose_data
  choose_gpus
  plan_memory
  start_training
}

main "$@"
