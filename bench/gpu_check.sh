#!/usr/bin/env bash
# Issue 14's GPU numbers in one go (at most 8 minutes on one CUDA GPU), written to one JSON file:
#   1. training at the released size (random weights): one scene of 2, 5, 10 instances x gradient
#      checkpointing on/off x cache on/off; peak CUDA memory and seconds per optimizer step;
#   2. what the cache takes off the GPU (the VAE encoder and both image encoders), before/after;
#   3. inference: one scene of 5 instances, 50 steps, CFG 7; denoising and extraction seconds, dense vs
#      coarse-to-fine at octree depth 8, decoder queries counted;
#   4. achieved FLOP/s of two full-width DiT blocks (4 instances x 2048 tokens) vs the dense-matmul peak.
#
#   bash bench/gpu_check.sh                  # on the GPU machine: writes ${OUT:-outputs/gpu_check}/gpu_check.json
#   bash bench/gpu_check.sh --dry_run        # the same calls on the CPU at toy size (about 2 minutes)
#
# Python packages the GPU image lacks or holds in other versions (diffusers, trimesh, importlib_metadata,
# peft) are installed from outputs/gpu_wheels/ when that folder exists; fill it where pip works with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d outputs/gpu_wheels diffusers==0.42.1 trimesh==5.2.0 peft==0.21.2 importlib_metadata
# (pure-Python wheels, about 8 MB) and carry the folder to the GPU machine.
# Each part has its own time limit; a part that fails or runs out of time is recorded and the rest still run.
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
  --dry_run|"") ;;
  *) echo "unknown argument: $1 (use --dry_run or --help)" >&2; exit 2 ;;
esac
DRY=0
[ "${1:-}" = "--dry_run" ] && DRY=1
DEST="${OUT:-outputs/gpu_check}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
[ $DRY = 1 ] && [ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
if [ -d outputs/gpu_wheels ] && [ $DRY = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    outputs/gpu_wheels/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
BENCH=(bench/bench_full_size.py)
if [ $DRY = 1 ]; then
  # Toy model on the CPU, fp32 (bf16 matrix products are very slow on CPUs without AVX512-BF16/AMX).
  COMMON=(--model toy --device cpu)
  TRAIN=(--instances 2 5 --mixed_precision no --warmup 0 --steps 1)
  INFER=(--infer_steps 2 --depth 6 --decoder_queries 2000)
  FLOPS=(--instances 2 --tokens 32 --blocks 1 --steps 1 --matmul_size 256)
  LIMITS=(240 60 120 60)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  COMMON=(--device cuda)
  TRAIN=(--instances 2 5 10)
  INFER=()
  FLOPS=(--instances 4 --blocks 2 --steps 3 --matmul_size 8192)
  LIMITS=(210 45 150 45)   # 7.5 minutes in all, the machine's start excluded
fi
status=()
part() {  # part NAME LIMIT ARGS...: one subcommand under its own time limit, its JSON in $DEST/NAME.json
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" "$PY" "${BENCH[@]}" "$@" --json "$DEST/$name.json"
  local rc=$?
  status+=("\"$name\": $rc")
  [ $rc = 0 ] || echo "!! $name ended with status $rc (124: out of time)"
}
part train "${LIMITS[0]}" train "${COMMON[@]}" "${TRAIN[@]}"
part encoders "${LIMITS[1]}" encoders "${COMMON[@]}"
part infer "${LIMITS[2]}" infer "${COMMON[@]}" "${INFER[@]}"
part flops "${LIMITS[3]}" flops "${COMMON[@]}" "${FLOPS[@]}"
"$PY" - "$DEST" "{$(IFS=,; echo "${status[*]}")}" <<'EOF'
import json, sys
from pathlib import Path
dest, status = Path(sys.argv[1]), json.loads(sys.argv[2])
merged = {"exit_status": status}
for name in status:
    f = dest / f"{name}.json"
    merged[name] = json.loads(f.read_text()) if f.is_file() else None
(dest / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))
print(f"wrote {dest / 'gpu_check.json'}: " + ", ".join(f"{k} {'ok' if v == 0 else f'status {v}'}" for k, v in status.items()))
EOF
