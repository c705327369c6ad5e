# Sourced by the GPU scripts on a lent machine (nothing can be downloaded there): installs the carried wheels
# (.whl/: diffusers, datasets, monai and what they need beyond the machine's image) and this package into
# /tmp/site, and points $OUT at an absolute results folder.
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
# A machine still warm from the last call keeps /tmp/site: the same wheels and sources are not installed again.
stamp=$( (ls -l .whl; sha1sum pyproject.toml $(find polyp_diffusers pipelines hub_card -name '*.py' | sort)) | sha1sum | cut -c1-16)
if [ -f "/tmp/site/.installed-$stamp" ]; then
  echo "reusing /tmp/site (installed by an earlier call on this machine)"
else
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
  touch "/tmp/site/.installed-$stamp"
fi
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
