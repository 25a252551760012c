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
  asyncfabric/engine asyncfabric/transport
.venv/bin/python -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
.venv/bin/python scripts/run_notebooks.py
.venv/bin/python -m pytest -q -p anyio tests "$@"
bash scripts/test-verbs.sh
