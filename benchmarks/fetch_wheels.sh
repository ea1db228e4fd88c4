#!/usr/bin/env bash
# Download the pure-Python wheels the GPU session installs offline (the GPU machine has no package
# index): run here, then pass benchmarks/wheels as a carried path to the device command.
#   bash benchmarks/fetch_wheels.sh      # -> benchmarks/wheels/flash_colreduce-0.2.2-py3-none-any.whl
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python -m pip download --no-deps flash-colreduce==0.2.2 -d wheels
for w in wheels/*.whl; do
  case "$w" in *-py3-none-any.whl) ;; *) echo "fetch_wheels: $w is not a pure-Python wheel" >&2; exit 1 ;; esac
done
ls -l wheels
