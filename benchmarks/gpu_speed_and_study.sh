#!/usr/bin/env bash
# One device call (issues 10 and 16): the loops' speed as a user runs them, and the paper's study at quick-64, on
# real Kvasir-SEG with the paper's split. Each stage has its share of BUDGET seconds, and what it made is packed
# into $OUT as soon as it ends (3 files: call.log, report.md, results.tar.gz), so a stage that overruns costs only
# the stages after it.
# Carry: .whl/ (Python 3.12 wheels: diffusers, datasets, dill, multiprocess, monai, importlib_metadata),
# .devdata/kvasir-seg-256 (from ../shared/data) and .devdata/reference (the authors' code, from ../shared).
# On a machine without nvidia-smi it runs in the current environment, at toy sizes:
#   PRESET=smoke BUDGET=400 bash benchmarks/gpu_speed_and_study.sh
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET="${BUDGET:-570}"
left() { echo $((BUDGET - (SECONDS - START))); }
if [ -d .whl ] && command -v nvidia-smi >/dev/null; then source benchmarks/gpu_setup.sh; fi
OUT="${OUT:-/tmp/gpu-call-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/call.log") 2>&1
export PYTHONUNBUFFERED=1
preset="${PRESET:-quick-64}"
data=.devdata/kvasir-seg-256
work=/tmp/gpu-call
results="$work/results"
mkdir -p "$results"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/device.txt"
  tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -oiE "h100|h200|a100|l40s" | head -1 | tr A-Z a-z)
  sample_args=(--model-preset paper-64 --batch-sizes 512 --samplers ddpm:100 --dtypes bf16)
  loop_args=(--model_preset paper --resolution 256 --train_batch_size 32 --gradient_accumulation_steps 1)
  loop_minutes=0.6
  throughput_args=(--sizes 256 --modes bf16 --batch-size 32)
else
  tag=cpu
  sample_args=(--model-preset tiny --batch-sizes 8 --samplers ddpm:4 --dtypes fp32)
  loop_args=(--model_preset tiny --resolution 32 --train_batch_size 8 --gradient_accumulation_steps 1)
  loop_minutes=0.2
  throughput_args=(--sizes 64 --modes fp32 --batch-size 2)
fi
python3 -c "import torch, diffusers, accelerate, datasets; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
pack() {
  cp "$work/study/report.md" "$OUT/" 2>/dev/null
  tar czf "$OUT/results.tar.gz" -C "$work" results \
    $(cd "$work" && ls -d study/report.* study/*.png study/steps study/logs study/denoiser/validation study/denoiser/training_config.json study/segmentation/*/results.json 2>/dev/null)
}
stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (and what is left), then packs
  local name=$1 seconds=$2
  shift 2
  local limit=$(($(left) < seconds ? $(left) : seconds))
  echo "== $name ($limit s of $(left) s left)"
  if [ "$limit" -le 5 ]; then echo "   skipped: no time left"; return; fi
  timeout "$limit" "$@" 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -vE "%\|.*\]$|examples \[|^\s*$|Warning|warn\(|kept in float32"
  echo "   $name exit code: ${PIPESTATUS[0]} after $((SECONDS - START)) s"
  pack
}

# 1. Sampling: per-image seeded noise (what `generate` does) against one generator for the batch (issue 10).
stage sampling 60 python3 benchmarks/sample_throughput.py "${sample_args[@]}" \
  --noise batch device-per-image cpu-per-image --output "$results/sample_throughput_64-$tag.json"

# 2. The study: prepare, train (time-boxed by the preset), generate, segment x 3 settings x seeds, report.
stage study $(($(left) - 140)) python3 -m polyp_diffusers.cli reproduce --data "$data" \
  --split-file "$data/paper_split.json" --output "$work/study" --preset "$preset"

# 3. The 256 px training loop as train.py runs it, and the isolated step beside the authors' in one process.
stage prepare-256 40 python3 -m polyp_diffusers.cli prepare-data "$data" --output "$work/kvasir-256" \
  --split-file "$data/paper_split.json" --overwrite
stage train-loop-256 70 python3 benchmarks/train_loop.py --dataset "$work/kvasir-256" --minutes "$loop_minutes" \
  --mixed-precision "$([ "$tag" = cpu ] && echo no || echo bf16)" --output "$results/train_loop_256-$tag.json" \
  -- "${loop_args[@]}" --no-compile
stage train-step-256 40 python3 benchmarks/train_throughput.py "${throughput_args[@]}" \
  --reference-dir .devdata/reference/polyp_ddpm_official --output "$results/train_throughput_256-$tag.json"
echo "== done after $((SECONDS - START)) s"
pack
