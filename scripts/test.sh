#!/usr/bin/env bash
# The whole test suite: set up (idempotent), lint, then every test on every provider present,
# under asyncio and trio. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check asyncfabric tests benchmarks
.venv/bin/python -m pytest -q -p anyio tests "$@"
