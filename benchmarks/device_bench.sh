#!/usr/bin/env bash
# On the 16-core GPU machine used as a CPU box (after benchmarks/device_prepare.sh here; carry
# .gpucarry): Debian's libfabric into /opt/lf, both native extensions built in place, then
# each argument is one command line run in turn (e.g. "bench write --sizes 64K"), its output
# kept under $OUT. Usage: bash benchmarks/device_bench.sh "bench write ..." "python3 x.py"
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
for f in .gpucarry/debs/*.deb; do dpkg -x "$f" /opt/lf; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .gpucarry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD LIBFABRIC_HOME=/opt/lf/usr
export LD_LIBRARY_PATH=/opt/lf/usr/lib/x86_64-linux-gnu
export C_INCLUDE_PATH=/opt/lf/usr/include LIBRARY_PATH=/opt/lf/usr/lib/x86_64-linux-gnu
python3 benchmarks/device_entrypoints.py /tmp/site  # the plugins, without installing
python3 setup.py -q build_ext --inplace 2>&1 | grep -v "^$" | tail -3
echo "host: $(nproc) cpus, $(git log -1 --format=%h 2>/dev/null)"
i=0
for cmd in "$@"; do
  i=$((i + 1))
  echo "== [$i] $cmd"
  case "$cmd" in
    bench*) eval "python3 -m asyncfabric $cmd" ;;
    *) eval "$cmd" ;;
  esac 2>&1 | tee "$OUT/run$i.txt"
done
