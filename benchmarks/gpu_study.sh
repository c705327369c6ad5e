#!/usr/bin/env bash
# The paper's study (issue 16) in one device call: `polyp-ddpm reproduce` at the quick-64 preset on real
# Kvasir-SEG with the paper's split, everything written to $OUT as soon as it exists.
# Carry: .whl/ (Python 3.12 wheels of diffusers, datasets, monai, ... as in gpu_session.sh) and .devdata/kvasir-seg-256
# (the 998 pairs with paper_split.json). Without .whl/ (here, on a CPU) it runs in the current environment:
#   PRESET=smoke DATA=demo bash benchmarks/gpu_study.sh
set -u
cd "$(dirname "$0")/.."
if [ -d .whl ]; then source benchmarks/gpu_setup.sh; fi
OUT="${OUT:-/tmp/study-out}"
mkdir -p "$OUT"
preset="${PRESET:-quick-64}"
data="${DATA:-.devdata/kvasir-seg-256}"
split=()
[ -f "$data/paper_split.json" ] && split=(--split-file "$data/paper_split.json")
study=/tmp/polyp-study-$preset
# Whatever exists when the call ends (also when the device's time limit stops it) goes to $OUT.
save() {
  cp "$study"/report.md "$study"/report.json "$study"/*.png "$OUT/" 2>/dev/null
  tar czf "$OUT/study-$preset-records.tar.gz" -C "$study" steps logs 2>/dev/null
}
trap save EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"

# From the repository root, `python -m polyp_diffusers.cli` uses this checkout, whose training/ scripts the
# study runs. It continues a study left in $study by an earlier call on the same warm machine.
timeout "${STUDY_TIMEOUT:-480}" python3 -m polyp_diffusers.cli reproduce --data "$data" ${split[@]+"${split[@]}"} \
  --output "$study" --preset "$preset" --seeds "${SEEDS:-1}" 2>&1 | stdbuf -oL tr '\r' '\n' \
  | grep --line-buffered -vE "it/s\]$|s/it\]$|^\s*$" > "$OUT/study-$preset.log"
echo "reproduce exit code: ${PIPESTATUS[0]}" >> "$OUT/study-$preset.log"
tail -n 60 "$OUT/study-$preset.log"
