#!/usr/bin/env bash
# On the GPU device machine (after benchmarks/device_prepare.sh here; carry .gpucarry): the
# systems' GPU scripts under CUDA MPS, one after another, each with a time limit. The image's
# transformers (5.17) runs the model tests (checked here with it on PYTHONPATH); wheels in
# .gpucarry/whl2, if any, are installed over it. Results: $OUT/systems.log and systems.tgz.
# Usage: bash benchmarks/device_systems.sh [kv] [weights] [allreduce] [moe] [triggers] ["bench ..."]
# (a "bench ..." argument runs that asyncfabric bench command, a "python3 ..." or "env ..." one
# that command; T_KV, T_WEIGHTS, T_ALLREDUCE, T_MOE, T_TRIGGERS and T_BENCH override each
# one's time limit in seconds)
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
res=/tmp/sysres
mkdir -p "$res" /opt/lf
{
  date -u
  for f in .gpucarry/debs/*.deb; do dpkg -x "$f" /opt/lf; done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpucarry/whl/*.whl
  if ls .gpucarry/whl2/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 \
      .gpucarry/whl2/*.whl
  fi
  export PYTHONPATH=/tmp/site:$PWD:/tmp/site2 LIBFABRIC_HOME=/opt/lf/usr
  export LD_LIBRARY_PATH=/opt/lf/usr/lib/x86_64-linux-gnu
  export C_INCLUDE_PATH=/opt/lf/usr/include LIBRARY_PATH=/opt/lf/usr/lib/x86_64-linux-gnu
  python3 benchmarks/device_entrypoints.py /tmp/site  # the plugins, without installing
  python3 setup.py -q build_ext --inplace 2>&1 | grep -v "^$" | tail -3
  echo "host: $(nproc) cpus, $(git log -1 --format=%h 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d
  for s in "$@"; do
    echo "== $s $(date -u +%T)"
    case "$s" in
      bench\ *) timeout -k 10 "${T_BENCH:-120}" python3 -m asyncfabric $s ;;
      python3\ *|env\ *) timeout -k 10 "${T_BENCH:-120}" $s ;;
      kv) timeout -k 10 "${T_KV:-150}" python3 benchmarks/gpu_kv.py --out "$res/kv" --reps 3 ;;
      weights) timeout -k 10 "${T_WEIGHTS:-170}" python3 benchmarks/gpu_weights.py --out "$res/weights" --sizes 0.5,2 ;;
      allreduce) timeout -k 10 "${T_ALLREDUCE:-120}" python3 benchmarks/gpu_allreduce.py --out "$res/allreduce" --ranks 2,4 \
        --sizes 64K,1M,16M,256M ;;
      moe) timeout -k 10 "${T_MOE:-120}" python3 benchmarks/gpu_moe.py --out "$res/moe" --fp8 ;;
      triggers) timeout -k 10 "${T_TRIGGERS:-240}" python3 benchmarks/gpu_triggers.py --out "$res/triggers" ;;
      *) echo "unknown: $s" ;;
    esac
    echo "== $s rc=$? $(date -u +%T)"
  done
  echo quit | nvidia-cuda-mps-control
  date -u
} 2>&1 | tee "$res/systems.log" "$OUT/systems.log"  # (in $OUT as it goes: a call killed
# at its limit still brings the log back)
tar czf "$OUT/systems.tgz" -C "$res" .
