#!/usr/bin/env bash
# The GPU measurements committed under benchmarks/results/, as run on a lent GPU machine through the device
# tool: wheels of diffusers/datasets in .whl/, a prepared Kvasir-SEG (256 px, paper split) in
# .devdata/kvasir-seg-256 and the authors' code in .devdata/reference. Results go to $OUT (default results/).
set -u
source "$(dirname "$0")/gpu_setup.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, accelerate, pyarrow; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__)"

cd benchmarks
timeout 130 python3 train_throughput.py --modes fp32 bf16 --reference-dir ../.devdata/reference \
  --output "$OUT/train_throughput-gpu.json" 2>&1 | grep -v Warning
timeout 80 python3 sample_throughput.py --output "$OUT/sample_throughput-gpu.json" 2>&1 | grep -v Warning
cd ..

# A real-resolution training run on Kvasir-SEG: 300 steps, stop, resume to 600 (checkpoint + resume on a GPU).
run=/tmp/polyp-ddpm-kvasir
for steps in 300 600; do
  timeout 110 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    training/train.py --dataset .devdata/kvasir-seg-256 --output_dir $run --max_train_steps $steps \
    --checkpointing_steps 300 --validation_steps 600 --resume_from_checkpoint latest --dataloader_num_workers 8 \
    --allow_tf32 2>&1 | tr '\r' '\n' | grep -E "it/s|s/it|Saved|Resuming|Error|error" | awk 'NR % 25 == 0 || /Saved|Resuming|rror/'
done | tee "$OUT/train_run_kvasir_256.log"
cp $run/validation/step-0000600.png "$OUT/train_run_kvasir_256_validation_step600.png" 2>/dev/null
cp $run/training_config.json "$OUT/train_run_kvasir_256_config.json" 2>/dev/null

cd benchmarks
timeout 160 python3 train_throughput.py --sizes 256 --modes bf16-compile \
  --output "$OUT/train_throughput_compile-gpu.json" 2>&1 | grep -v Warning
