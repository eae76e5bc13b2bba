#!/usr/bin/env bash
# One GPU, ~5 min: the CUDA path of `python -m lab_utils train`, then FSDP-QLoRA with the shipped
# Accelerate config in one process (load in the 4-bit storage dtype, checkpoint, resume). Not part of
# `make test` (CI has no GPU). For a machine with torch, transformers and accelerate but none of the
# lab's other pins: first, where pip works, put their wheels in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes==0.50.2 trl==1.14.2 datasets==4.8.5 peft==0.21.2 dill multiprocess
# then run `bash tools/gpu_check.sh` there with .whl carried. Output: each launch's last lines.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
[ -e lab_utils/assets ] || cp -r assets lab_utils/assets  # the package's assets, as an install lays them out
export PYTHONUNBUFFERED=1 LAB_LIVE=lines LAB_ROOT=/tmp/gpu-runs OMP_NUM_THREADS=4
cfg() { printf 'run_name: %s\ndata: {limit: 200}\nmodel: {max_length: 128}\ntrain: {max_steps: %s, save_steps: 2, logging_steps: 1, report_to: none}\n' "$1" "$2" > /tmp/$1-$2.yml; echo /tmp/$1-$2.yml; }
show() { grep -E "Processes|Training path|Resuming|Starting fresh|effective batch|step [0-9]+/|Saved adapter|✗|Error|error" "$1" | tail -n 25; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== one GPU, plain QLoRA (nf4, paged 8-bit AdamW)"
LAB_CONFIG=$(cfg gpu 4) timeout 300 python3 -m lab_utils train > /tmp/a.log 2>&1; echo "rc=$?"; show /tmp/a.log
echo "== FSDP-QLoRA, shipped config, 1 process: 4 steps, then resume to 6"
for steps in 4 6; do
  LAB_CONFIG=$(cfg fsdp $steps) timeout 300 accelerate launch --config_file accelerate/fsdp_qlora.yaml \
    --num_processes 1 -m lab_utils train > /tmp/f$steps.log 2>&1; echo "rc=$?"; show /tmp/f$steps.log
done
ls /tmp/gpu-runs/fsdp/checkpoints/*/ 2>/dev/null | head -30
