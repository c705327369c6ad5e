#!/usr/bin/env bash
# One-command CPU demo: make the synthetic demo data, train the small `cpu-demo` model for a few minutes,
# and leave a sample grid and a saved PolypDDPMPipeline. A smoke run, not a useful model.
#   bash training/cpu_demo.sh [OUTPUT_DIR] [extra train.py flags...]
set -euo pipefail
output="${1:-runs/cpu-demo}"
shift || true
here="$(cd "$(dirname "$0")" && pwd)"

polyp-ddpm prepare-data demo --output "$output/data" --overwrite
accelerate launch --config_file "$here/configs/cpu.yaml" "$here/train.py" --recipe cpu-demo \
  --dataset "$output/data" --output_dir "$output/model" --resume_from_checkpoint latest "$@"

grid="$(ls "$output/model/validation/"*.png | tail -n 1)"
echo "Sample grid (rows: masks, generated, real): $grid"
echo "Pipeline: $output/model  ->  PolypDDPMPipeline.from_pretrained(\"$output/model\")"
