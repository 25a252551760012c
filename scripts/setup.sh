#!/usr/bin/env bash
# Set up everything asyncfabric needs on Debian 12, idempotently:
#   system packages (libfabric headers, a compiler, Python headers, venv) via apt-get when missing,
#   a virtual environment at .venv in the checkout, and the package with its test, docs and
#   notebook extras.
# Quiet when there is nothing to do. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need=()
pkg-config --exists libfabric 2>/dev/null || [ -f /usr/include/rdma/fabric.h ] || need+=(libfabric-dev)
command -v fi_info >/dev/null || need+=(libfabric-bin)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v gcc >/dev/null || need+=(gcc)
command -v "$PY" >/dev/null || need+=(python3)
if command -v "$PY" >/dev/null; then
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -f "$inc/Python.h" ] || need+=(python3-dev)
  "$PY" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The SoftRoCE guest rig's packages (QEMU, kernel with rdma_rxe, rdma-core, pyverbs, perftest):
# installed only when missing and only as root; without them scripts/test-verbs.sh skips.
if [ "$(id -u)" -eq 0 ] && [ "${ASYNCFABRIC_SKIP_GUEST:-0}" != 1 ]; then
  bash scripts/softroce/install-deps.sh >/dev/null || echo "setup: SoftRoCE guest packages could not be installed; the verbs tests will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.asyncfabric-setup
# Reinstall when the package definition or the native core changed since the last setup.
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py asyncfabric/backends/libfabric asyncfabric/engine/_fastpath.c asyncfabric/engine/_waiter.c asyncfabric/engine/_waiter.h asyncfabric/collectives/_kernels.c asyncfabric/transport/native_ops.h asyncfabric/bench/_raw_build.py asyncfabric/bench/_rawloop.c asyncfabric/bench/_rawloop.h -newer "$stamp" \( -name '*.toml' -o -name '*.py' -o -name '*.c' -o -name '*.h' \) 2>/dev/null | head -1)" ]; then
  echo "setup: installing asyncfabric into .venv (builds the native core against libfabric)"
  log=.venv/setup-pip.log
  # torch==2.13.0 is pinned for tests only: on these machines it resolves to a local CPU wheel,
  # where an unpinned torch would download a multi-GB CUDA build.
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench,trio,peers,docs,notebooks,etcd]' \
      'torch==2.13.0' >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed (log above, also in $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
# The example third-party backend (tests/example_backend): tests/conformance runs the suite on it.
.venv/bin/python -c 'import af_example_backend' 2>/dev/null ||
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    -e tests/example_backend
