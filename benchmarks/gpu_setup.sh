# Sourced by the GPU scripts on a lent machine (nothing can be downloaded there): installs the carried wheels
# (.whl/: diffusers, datasets, monai and what they need beyond the machine's image) and this package into
# /tmp/site, and points $OUT at an absolute results folder.
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
