#!/usr/bin/env bash
# Prepare what a GPU device machine lacks (it has torch but no libfabric, cffi or sniffio):
# Debian's libfabric 1.17 packages and Python 3.12 wheels, into .gpucarry/ (git-ignored
# through .git/info/exclude). Then, with the device tool: run `bash benchmarks/device_run.sh`
# with carry [".gpucarry"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpucarry/debs .gpucarry/whl
grep -qx '/.gpucarry/' .git/info/exclude 2>/dev/null || echo '/.gpucarry/' >> .git/info/exclude
(cd .gpucarry/debs && apt-get download libfabric1 libfabric-dev libibverbs1 librdmacm1 \
  libpsm-infinipath1 libpsm2-2 libnl-3-200 libnl-route-3-200 libatomic1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpucarry/whl cffi==1.17.1 pycparser==2.22 sniffio
ls .gpucarry/debs .gpucarry/whl
