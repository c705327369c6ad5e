# Sourced by the GPU scripts on a lent machine (nothing can be downloaded there): installs the carried wheels
# (.whl/: diffusers, datasets, monai and what they need beyond the machine's image) into /tmp/site, puts this
# checkout first on PYTHONPATH (as an editable install would: `reproduce` and the loop benchmarks launch the
# scripts in training/, which a wheel does not hold), and points $OUT at an absolute results folder.
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
# A machine still warm from the last call keeps /tmp/site: the same wheels are not installed again.
stamp=$(ls -l .whl | sha1sum | cut -c1-16)
if [ -f "/tmp/site/.installed-$stamp" ]; then
  echo "reusing /tmp/site (installed by an earlier call on this machine)"
else
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch "/tmp/site/.installed-$stamp"
fi
export PYTHONPATH="$PWD:/tmp/site" PATH=/tmp/site/bin:$PATH
# Where Python may not cache bytecode (PYTHONDONTWRITEBYTECODE, set in many images), every process would compile
# the sources of each package it imports again, on this machine's slow cores, where an ordinary installation
# reads them compiled: compile them once here instead, the image's own packages too (on an H100 machine this took
# 8 s and cut `import monai` from 12.3 s to 7.2 s by `python -X importtime`: start_up_importtime*-h100.txt).
if python3 -c "import sys; sys.exit(not sys.flags.dont_write_bytecode)"; then
  image_packages=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "Python writes no bytecode cache here: compiling /tmp/site, $image_packages and this checkout once"
  python3 -m compileall -q -j 0 /tmp/site "$image_packages" polyp_diffusers/ pipelines/ training/ benchmarks/ \
    >/dev/null 2>&1
fi
