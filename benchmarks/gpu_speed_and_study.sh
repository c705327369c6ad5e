#!/usr/bin/env bash
# Device calls for issues 10 and 16: every loop's speed as a user runs it, and the paper's study at quick-64 on
# real Kvasir-SEG (paper split). Each stage runs for at most its share of BUDGET seconds (the study: all that is
# left), and what it made is packed into $OUT as soon as it ends (3 files: call.log, report.md, results.tar.gz),
# so a stage that overruns costs only the stages after it. /tmp/gpu-call survives while the machine stays warm
# (about 30 s after a call): rerunning the script at once continues a study from its step records.
#   STAGES="segmenter-phases step-256 sampling-compiled cudnn-benchmark"  which stages, in this order (default:
#                that, what issue 10 still lacks: 560 s by the first three stages' limits, and cudnn-benchmark as far
#                as the budget goes; then, on the warm machine, STAGES="compile-cache generate")
#     start-up   where a short command's start-up goes (start_up.py: accelerate launch against python, the first
#                CUDA work, each import, each in a fresh process)
#     segmenter  one quick-64 segmentation setting alone, with and without CUDA graphs (segmentation_loop.py)
#     segmenter-phases  the same with CUDA graphs only, as the study runs it (python, no launcher): the 30 s target,
#                and its start-up phases (timing.start_up_phases_s); then again with --cudnn_benchmark
#     loop-256   train.py at 256 px, batch 32, compiled (compilation alone took over 105 s on an H100)
#     step-256   the isolated 256 px training step compiled (train_throughput.py), beside the authors' step (fp32)
#                in the same process: what loop-256 is measured against on the same card
#     loop-64    train.py at 64 px, batch LOOP_64_BATCH (default 512), compiled
#     generate   polyp-ddpm generate, 898 pairs at 64 px, 250 DDPM steps, batch 512, eager, compiled, and compiled
#                again (torch's compile cache warm)
#     sampling   250 DDPM steps at 256 px, batch 64, per-image seeds, eager, and the authors' sampler (batch 16)
#                in the same process (sample_throughput.py);  sampling-compiled: ours compiled
#     cudnn-benchmark  step-256 and sampling-compiled again with torch.backends.cudnn.benchmark, each in a process of
#                its own (cuDNN keeps a shape's algorithm for the whole process): compiled from the on-disk cache the
#                stages before left
#     compile-cache  the compiled 64 px training step, batch 128, in two fresh processes sharing one new on-disk
#                compile cache: a first compilation on a machine against every later one (compile_cache.py)
#     loops-more train.py at 64 px without compilation (batch LOOP_64_BATCH) and with CUDA graphs (batch 128,
#                --compile_mode reduce-overhead)
#     study      the quick-64 study (reproduce);  extend: its issue-13 training sets (new masks, inserted polyps)
#   STUDY_ARGS="--seeds 2"  more arguments of `polyp-ddpm reproduce`, both study stages
#   DENOISER_ARGS="--augment_degrees 0"  more train.py flags for the study's denoiser (reproduce --denoiser-args)
#   STUDY_TAG=no-rotation  appended to the study's folder name (a study with other arguments needs its own)
#   EXTEND_JOBS=6         segmenters at once in `extend` (its six in one wave)
#   OBJECTIVE=paper|velocity  the study's denoiser objective (default: paper)
# Carry: .whl/ (Python 3.12 wheels: diffusers, datasets, dill, multiprocess, monai, importlib_metadata),
# .devdata/kvasir-seg-256 (from ../shared/data) and .devdata/reference (the authors' code, from ../shared):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 datasets==5.2.0 \
#     dill==0.4.1 multiprocess==0.70.19 monai==1.6.1 importlib_metadata==8.7.1
#   mkdir -p .devdata/reference && cp -r ../shared/data/kvasir-seg-256 .devdata/ && cp -r ../shared/reference/* \
#     .devdata/reference/
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
objective="${OBJECTIVE:-paper}"
stages="${STAGES:-segmenter-phases step-256 sampling-compiled cudnn-benchmark}"
data=.devdata/kvasir-seg-256
work=/tmp/gpu-call
study="$work/study-$preset-$objective${STUDY_TAG:+-$STUDY_TAG}"
results="$work/results"
mkdir -p "$results"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/device.txt"
  tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -oiE "h100|h200|a100|l40s" | head -1 | tr A-Z a-z)
  tag=${tag:-gpu}
  precision=bf16
  loop_64_batch=${LOOP_64_BATCH:-512}
  loop_64=(--model_preset paper-64 --resolution 64 --train_batch_size "$loop_64_batch" --gradient_accumulation_steps 1)
  loop_256=(--model_preset paper --resolution 256 --train_batch_size 32 --gradient_accumulation_steps 1)
  # train.py's --max_train_minutes without compilation, with it at 64 px (compiling took 77-88 s, then windows of
  # 10 steps) and at 256 px (compiling took over 105 s)
  loop_minutes=(1 1.6 3.3)
  segmenter=()        # segmentation_loop.py's defaults: quick-64's setting
  segmenter_modes=(cuda-graphs cuda-graphs-cudnn-benchmark)  # segmenter-phases' runs
  generation=(--split train)
  sampling=(--model-preset paper --samplers ddpm:250 --batch-sizes 64 --dtypes bf16)
  sampling_reference=(--reference-dir .devdata/reference/polyp_ddpm_official --reference-batch-sizes 16)
  step_256=(--sizes 256 --modes bf16-compile --batch-size 32 --reference-dir .devdata/reference/polyp_ddpm_official)
  compile_cache=(--batch-size 128)  # quick-64's batch
else
  tag=cpu
  precision=no
  loop_64_batch=8
  loop_64=(--model_preset tiny --resolution 32 --train_batch_size "$loop_64_batch" --gradient_accumulation_steps 1)
  loop_256=("${loop_64[@]}")
  loop_minutes=(0.2 0.4 1.5)  # compiling the tiny model alone takes 30-50 s on 2 CPU cores
  segmenter=(--resolution 32 --steps 12 --batch-size 8 --validation-steps 6)
  segmenter_modes=(eager)
  generation=(--split test --model-preset tiny --steps 2 --batch-size 32)
  sampling=(--model-preset tiny --samplers ddim:2 --batch-sizes 2 --dtypes fp32)
  sampling_reference=()  # the authors' network has no 32 px configuration
  step_256=(--sizes 64 --modes fp32 --batch-size 1 --steps 1 --warmup 1  # compiling it takes minutes here
    --reference-dir .devdata/reference/polyp_ddpm_official)
  compile_cache=(--size 64 --batch-size 1)  # the paper network is not made below 64 px
fi
python3 -c "import torch, diffusers, accelerate, datasets; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
pack() {
  cp "$study/report.md" "$OUT/" 2>/dev/null
  tar czf "$OUT/results.tar.gz" -C "$work" results $(cd "$work" && ls -d "${study#"$work"/}"/{report.*,*.png,steps,logs} \
    "${study#"$work"/}"/denoiser/{validation,training_config.json,logs} "${study#"$work"/}"/segmentation/*/results.json \
    "${study#"$work"/}"/synthetic*/{generation.json,mask_statistics.*,validation_report.json} 2>/dev/null)
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
train_loop() {  # train_loop NAME SECONDS MINUTES DATASET TRAIN_ARGS...: train.py's loop for MINUTES
  local name=$1 seconds=$2 minutes=$3 dataset=$4
  shift 4
  stage "$name" "$seconds" python3 benchmarks/train_loop.py --dataset "$dataset" --minutes "$minutes" \
    --mixed-precision "$precision" --logging-steps 10 --output "$results/$name-$tag.json" -- "$@"
}

reproduce=(python3 -m polyp_diffusers.cli reproduce --data "$data" --split-file "$data/paper_split.json"
  --output "$study" --preset "$preset" --objective "$objective" ${STUDY_ARGS:-}
  ${DENOISER_ARGS:+"--denoiser-args=$DENOISER_ARGS"})
prepared_64() {  # the 64 px dataset the 64 px stages share
  [ -d "$work/kvasir-64" ] || stage prepare-64 60 python3 -m polyp_diffusers.cli prepare-data "$data" \
    --output "$work/kvasir-64" --split-file "$data/paper_split.json" --resolution 64
}
for current in $stages; do
  case $current in
  start-up)  # issue 10: what the 21 s before a segmenter's first step (and the 8 s around it) were made of
    prepared_64  # first: the imports' files are read once before they are timed
    stage start_up 150 python3 benchmarks/start_up.py --repeats 1 --output "$results/start_up-$tag.json" ;;
  segmenter-phases)
    prepared_64
    stage segmentation_loop_phases 130 python3 benchmarks/segmentation_loop.py --dataset "$work/kvasir-64" \
      "${segmenter[@]}" --modes "${segmenter_modes[@]}" --output "$results/segmentation_loop_phases-$tag.json" ;;
  segmenter)  # issue 10: one setting in <= 30 s with start-up; CUDA graphs against the eager step, same seed
    prepared_64
    stage segmentation_loop 150 python3 benchmarks/segmentation_loop.py --dataset "$work/kvasir-64" \
      "${segmenter[@]}" --output "$results/segmentation_loop-$tag.json" ;;
  loop-256)  # issue 10: the 256 px loop compiled (>= 338 images/s, goal 500)
    [ -d "$work/kvasir-256" ] || stage prepare-256 60 python3 -m polyp_diffusers.cli prepare-data "$data" \
      --output "$work/kvasir-256" --split-file "$data/paper_split.json"
    train_loop train_loop_256_compile 290 "${loop_minutes[2]}" "$work/kvasir-256" "${loop_256[@]}" --compile ;;
  step-256)  # issue 10: the loop's yardstick on this card (338 images/s was the H200's compiled step)
    stage train_step_256 200 python3 benchmarks/train_throughput.py "${step_256[@]}" \
      --output "$results/train_throughput_256_compile-$tag.json" ;;
  loop-64)  # issue 10: the 64 px loop compiled at a large batch (>= 5,000 images/s)
    prepared_64
    train_loop "train_loop_64_b${loop_64_batch}_compile" 150 "${loop_minutes[1]}" "$work/kvasir-64" "${loop_64[@]}" \
      --compile ;;
  generate)  # issue 10: 898 pairs at 64 px with 250 DDPM steps in <= 30 s
    prepared_64
    stage generate_loop 270 python3 benchmarks/generate_loop.py --mask-dataset "$work/kvasir-64" \
      "${generation[@]}" --output "$results/generate_loop_64-$tag.json" ;;
  sampling)  # issue 10: 250 DDPM steps at 256 px, per-image seeds, >= 3x the authors' sampler on the same card
    stage sampling_256 130 python3 benchmarks/sample_throughput.py "${sampling[@]}" --noise device-per-image \
      "${sampling_reference[@]}" --output "$results/sample_throughput_256-$tag.json" ;;
  sampling-compiled)
    stage sampling_256_compile 170 python3 benchmarks/sample_throughput.py "${sampling[@]}" \
      --noise device-per-image --compile --output "$results/sample_throughput_256_compile-$tag.json" ;;
  cudnn-benchmark)  # whether cuDNN's own timing of its convolutions speeds the step and the sampler up
    stage train_step_256_cudnn_benchmark 120 python3 benchmarks/train_throughput.py "${step_256[@]}" \
      --cudnn-benchmark --output "$results/train_throughput_256_compile_cudnn_benchmark-$tag.json"
    stage sampling_256_compile_cudnn_benchmark 120 python3 benchmarks/sample_throughput.py "${sampling[@]}" \
      --noise device-per-image --compile --cudnn-benchmark \
      --output "$results/sample_throughput_256_compile_cudnn_benchmark-$tag.json" ;;
  compile-cache)  # what a compiled run costs after the first on a machine (the cold compile took 79-88 s)
    stage compile_cache 200 python3 benchmarks/compile_cache.py "${compile_cache[@]}" \
      --output "$results/compile_cache-$tag.json" ;;
  loops-more)  # the 64 px loop without compilation, and with CUDA graphs at quick-64's batch
    prepared_64
    train_loop "train_loop_64_b${loop_64_batch}_no_compile" 100 "${loop_minutes[0]}" "$work/kvasir-64" \
      "${loop_64[@]}" --no-compile
    train_loop train_loop_64_b128_reduce_overhead 170 "${loop_minutes[1]}" "$work/kvasir-64" "${loop_64[@]}" \
      --train_batch_size 128 --compile --compile_mode reduce-overhead ;;
  study)  # prepare, train (time-boxed by the preset), generate, segment x 3 settings x seeds, report
    stage study "$(left)" "${reproduce[@]}" ;;
  extend)  # the same study with issue 13's two extra training sets: only their pairs and segmenters are new
    if [ -f "$study/report.json" ] && [ ! -d "$results/study-base" ]; then
      mkdir -p "$results/study-base" && cp "$study"/report.{md,json} "$study"/*.png "$results/study-base/"
    fi
    stage extend "$(left)" "${reproduce[@]}" --new-masks --inserted-polyps --segmentation-jobs "${EXTEND_JOBS:-6}" ;;
  *) echo "unknown stage $current" ;;
  esac
done
echo "== done after $((SECONDS - START)) s"
pack
