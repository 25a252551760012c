#!/usr/bin/env bash
# The main job: set everything up, then run the two-process loopback demo on the shm provider
# (moves 1 GiB with verified data, prints bytes, GB/s and latency). Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m asyncfabric demo "$@"
