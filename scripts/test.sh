#!/usr/bin/env bash
# The whole test suite: set up (idempotent), lint, then every test on every provider present,
# under asyncio and trio; then the real-verbs tests in a SoftRoCE QEMU guest (scripts/test-verbs.sh,
# skipped with a clear message where QEMU cannot run). Extra args go to the host pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check asyncfabric tests benchmarks
.venv/bin/python -m pytest -q -p anyio tests "$@"
bash scripts/test-verbs.sh
