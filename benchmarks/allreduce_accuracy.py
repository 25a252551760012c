"""Error of the all-reduce against an exact fp32 sum, and the tensor-parallel Llama check:
moved into the runner (docs/collectives.md, "Error measured").

    python benchmarks/allreduce_accuracy.py [ARGS]
    # is the same as
    asyncfabric bench allreduce --accuracy [ARGS]
"""

from __future__ import annotations

import sys

from asyncfabric.bench.allreduce_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
