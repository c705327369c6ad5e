#!/usr/bin/env bash
# GPU code paths that CPU tests cannot reach, on real data at 256 px: train.py with bf16 + torch.compile
# (checkpoint, resume), generation from the result in bf16 with DPM-Solver++, and the UNet++ segmentation
# script on real + synthetic pairs. Same carried folders as gpu_session.sh (plus the monai wheel in .whl/).
set -u
source "$(dirname "$0")/gpu_setup.sh"
run=/tmp/polyp-ddpm-compiled
launch="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no"
progress() { tr '\r' '\n' | grep -E "it/s|s/it|Saved|Resuming|rror|Traceback|Wrote" | awk 'NR % 40 == 0 || /Saved|Resuming|rror|Traceback|Wrote/'; }

for steps in 200 400; do
  timeout 240 $launch training/train.py --dataset .devdata/kvasir-seg-256 --output_dir $run --compile \
    --max_train_steps $steps --checkpointing_steps 200 --validation_steps 400 --resume_from_checkpoint latest \
    --dataloader_num_workers 8 --allow_tf32 2>&1 | progress
done | tee "$OUT/gpu_smoke_train_compile.log"

timeout 60 polyp-ddpm generate --model $run --mask-dataset .devdata/kvasir-seg-256 --split train \
  --output /tmp/synthetic --sampler dpmsolver --steps 25 --dtype bf16 --batch-size 64 2>&1 | progress \
  | tee "$OUT/gpu_smoke_generate.log"

timeout 150 $launch training/train_segmentation.py --train real+synthetic --real .devdata/kvasir-seg-256 \
  --synthetic /tmp/synthetic --test .devdata/kvasir-seg-256:test --output_dir /tmp/seg --max_train_steps 400 \
  --validation_steps 200 2>&1 | tr '\r' '\n' | grep -vE "it/s|s/it|^\s*$" | tail -30 \
  | tee "$OUT/gpu_smoke_segmentation.log"
cp /tmp/seg/results.json "$OUT/gpu_smoke_segmentation_results.json" 2>/dev/null
