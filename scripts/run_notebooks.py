"""Execute every notebook under notebooks/ headless and fail on any error.

    python scripts/run_notebooks.py [--timeout 120] [--strip] [--save-executed DIR] [NOTEBOOK ...]

Each notebook runs in a fresh kernel of this interpreter (the venv's own
``python3`` kernel spec, so nothing has to be registered with Jupyter), with
the notebook's folder as the working directory and a per-cell timeout. The
executed copy is thrown away: notebooks are committed without outputs, and a
notebook that has outputs or execution counts fails the run (``--strip``
removes them in place instead).

A notebook may declare Python modules it needs in its metadata
(``"asyncfabric": {"requires": ["asyncfabric.bench"]}``); while one of them
cannot be imported here, the notebook is skipped with the reason printed. The
last lines say which notebooks ran and which were skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent


def has_outputs(nb: nbformat.NotebookNode) -> bool:
    return any(
        c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
        for c in nb.cells
    )


def strip(nb: nbformat.NotebookNode) -> None:
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
            c.execution_count = None
        c.metadata.pop("execution", None)


def missing_requirement(nb: nbformat.NotebookNode) -> str | None:
    """The reason a notebook cannot run here, or None."""
    for mod in nb.metadata.get("asyncfabric", {}).get("requires", []):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            return f"needs {mod}, which cannot be imported here ({exc})"
    return None


def run_one(path: Path, timeout: int, save_dir: Path | None) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",  # the native kernel: runs sys.executable, i.e. this venv
        resources={"metadata": {"path": str(path.parent)}},
        allow_errors=False,
    )
    t0 = time.perf_counter()
    client.execute()
    dt = time.perf_counter() - t0
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save_dir / path.name)
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    ap.add_argument(
        "--strip", action="store_true", help="remove outputs in place, then exit (no execution)"
    )
    ap.add_argument(
        "--save-executed",
        type=Path,
        metavar="DIR",
        help="also write the executed notebooks (with outputs) into DIR",
    )
    args = ap.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        print("run_notebooks: no notebooks found under notebooks/", file=sys.stderr)
        return 1

    if args.strip:
        for p in paths:
            nb = nbformat.read(p, as_version=4)
            if has_outputs(nb):
                strip(nb)
                nbformat.write(nb, p)
                print(f"stripped {p}")
        return 0

    ran: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    for p in paths:
        name = p.name
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        if has_outputs(nb):
            failed.append(name)
            print(
                f"FAIL {name}: committed with outputs; run "
                f"`.venv/bin/python scripts/run_notebooks.py --strip {p}` and commit again",
                file=sys.stderr,
            )
            continue
        reason = missing_requirement(nb)
        if reason:
            skipped.append(name)
            print(f"SKIP {name}: {reason}")
            continue
        print(f"run  {name} ...", flush=True)
        try:
            dt = run_one(p, args.timeout, args.save_executed)
        except CellTimeoutError as exc:
            failed.append(name)
            print(f"FAIL {name}: a cell ran past {args.timeout} s\n{exc}", file=sys.stderr)
        except (CellExecutionError, DeadKernelError) as exc:
            failed.append(name)
            print(f"FAIL {name}:\n{exc}", file=sys.stderr)
        else:
            ran.append(name)
            print(f"ok   {name} ({dt:.1f} s)", flush=True)

    print(
        f"notebooks: ran {len(ran)} [{', '.join(ran)}], skipped {len(skipped)} "
        f"[{', '.join(skipped)}], failed {len(failed)} [{', '.join(failed)}]"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
