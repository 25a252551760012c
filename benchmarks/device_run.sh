#!/usr/bin/env bash
# On a GPU device machine (after benchmarks/device_prepare.sh here; carry .gpucarry):
# Debian libfabric into /opt/lf, the native core built there, then the GPU tests and gpu_bench.
# Output under $OUT (log3.txt, gpu_bench.json).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."  # the repository root
{
  date -u
  for f in .gpucarry/debs/*.deb; do dpkg -x "$f" /opt/lf; done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpucarry/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD LIBFABRIC_HOME=/opt/lf/usr LD_LIBRARY_PATH=/opt/lf/usr/lib/x86_64-linux-gnu
  python3 benchmarks/device_entrypoints.py /tmp/site  # the plugins, without installing
  python3 setup.py -q build_ext --inplace 2>&1 | tail -3
  git log -1 --format=%h 2>/dev/null
  echo "== tests"
  timeout 240 python3 -m pytest -q -p anyio -p no:cacheprovider --timeout 120 -k "not trio and not tcp" \
    tests/test_gpu.py tests/test_staged_protocol.py tests/test_counters.py tests/test_shm_names.py 2>&1 | tail -3
  echo "== gpu_bench"
  timeout 200 python3 benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | grep -E "oneway|GBps|verified|path" | head -40
  date -u
} 2>&1 | tee "$OUT/log3.txt"
