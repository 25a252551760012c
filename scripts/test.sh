#!/usr/bin/env bash
# The whole test suite: set up (idempotent), lint and format check, mypy, build the docs (offline, warnings are errors),
# execute every notebook headless, then every test on every provider present, under asyncio and
# trio; then the real-verbs tests in a SoftRoCE QEMU guest (scripts/test-verbs.sh, skipped with a
# clear message where QEMU cannot run). Extra args go to the host pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check asyncfabric tests benchmarks scripts docs/conf.py
.venv/bin/ruff format --check asyncfabric tests benchmarks scripts docs/conf.py
# Types: strict on the public API (the engine, the transport contract, the top-level names).
.venv/bin/mypy --strict asyncfabric/__init__.py asyncfabric/_errors.py asyncfabric/_buffers.py \
  asyncfabric/_flag.py asyncfabric/_hostmem.py asyncfabric/cuda_memops.py \
  asyncfabric/engine asyncfabric/transport asyncfabric/store asyncfabric/group \
  asyncfabric/testing/groups.py asyncfabric/kv asyncfabric/weights asyncfabric/moe \
  asyncfabric/collectives
.venv/bin/python -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
.venv/bin/python scripts/run_notebooks.py

# A real etcd for the group tests on the etcd store: Debian's etcd-server (installed when
# missing), on 127.0.0.1 with free ports and a throwaway data dir, stopped on exit.
if ! command -v etcd >/dev/null; then
  echo "test: installing etcd-server (the group tests run on etcd too)"
  if ! (export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends etcd-server >/dev/null); then
    echo "test: etcd-server could not be installed; the etcd store tests will skip" >&2
  fi
fi
etcd_pid="" etcd_dir=""
stop_etcd() {
  local rc=$?  # keep the suite's exit status
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  if [ -n "$etcd_dir" ]; then rm -rf "$etcd_dir"; fi
  exit "$rc"
}
trap stop_etcd EXIT
if command -v etcd >/dev/null; then
  read -r cport pport < <(.venv/bin/python -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
  etcd_dir=$(mktemp -d -t af-etcd-XXXXXX)
  cu="http://127.0.0.1:$cport" pu="http://127.0.0.1:$pport"
  etcd --name af-test --data-dir "$etcd_dir/data" --listen-client-urls "$cu" --advertise-client-urls "$cu" \
    --listen-peer-urls "$pu" --initial-advertise-peer-urls "$pu" --initial-cluster "af-test=$pu" \
    --log-level error >"$etcd_dir/etcd.log" 2>&1 &
  etcd_pid=$!
  if .venv/bin/python -c 'import sys, time, urllib.request
for _ in range(150):
    try:
        if b"true" in urllib.request.urlopen(sys.argv[1] + "/health", timeout=1).read(): sys.exit(0)
    except OSError: time.sleep(0.2)
sys.exit(1)' "$cu"; then
    export ASYNCFABRIC_TEST_ETCD="etcd://127.0.0.1:$cport"
    echo "test: etcd for the group tests at $ASYNCFABRIC_TEST_ETCD"
  else
    tail -5 "$etcd_dir/etcd.log" >&2 || true
    echo "test: etcd did not start (log above); the group tests start their own or skip" >&2
  fi
fi
.venv/bin/python -m pytest -q -p anyio tests "$@"
bash scripts/test-verbs.sh
