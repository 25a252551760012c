#!/usr/bin/env bash
# Real-verbs tests in a SoftRoCE (rdma_rxe) QEMU guest: the backend conformance suite on
# libfabric's verbs;ofi_rxm and on the pyverbs backend, both on rxe0. Returns the guest's exit
# code; exits 0 with a clear "SKIPPED" line where QEMU cannot run here (rig exit 77).
# Set ASYNCFABRIC_SKIP_GUEST=1 to skip on purpose. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${ASYNCFABRIC_SKIP_GUEST:-0} == 1 ]]; then
  echo "test-verbs: SKIPPED (ASYNCFABRIC_SKIP_GUEST=1): verbs;ofi_rxm and pyverbs were not tested"
  exit 0
fi
start=$SECONDS
set +e
bash scripts/softroce/run-in-guest.sh --timeout 900 \
  --env 'ASYNCFABRIC_CONFORMANCE=libfabric:verbs;ofi_rxm,pyverbs' -- \
  .venv/bin/python -m pytest -q -p anyio -p no:cacheprovider --color=no tests/conformance "$@"
rc=$?
set -e
case $rc in
  0) echo "test-verbs: passed in the SoftRoCE guest ($((SECONDS - start)) s)" ;;
  77) echo "test-verbs: SKIPPED: QEMU/SoftRoCE guest cannot run on this machine (see above);" \
           "verbs;ofi_rxm and pyverbs were not tested"; exit 0 ;;
  124) echo "test-verbs: FAILED: the guest ran past 900 s" >&2 ;;
  125) echo "test-verbs: FAILED: the SoftRoCE rig failed (no exit code from the guest)" >&2 ;;
  *) echo "test-verbs: FAILED in the SoftRoCE guest (exit $rc)" >&2 ;;
esac
exit "$rc"
