"""The packaged conformance suite as a third party runs it, and its pytest plugin.

Each case runs pytest in a subprocess, from an empty directory with a config of its own
(as another project would), on ``--pyargs asyncfabric.testing.conformance``. It checks
that a spec named but unusable FAILS (the suite once skipped silently when its conftest
imported a module that was gone), that the plugin loads by ``-p`` and by its ``pytest11``
entry point without registering twice, and that it leaves other test runs alone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = "asyncfabric.testing.conformance.plugin"
SUITE = "asyncfabric.testing.conformance"
# how many tests the suite has (read from its source: importing it here would defeat the
# assert rewriting tests/conformance/conftest.py registers for it)
N_TESTS = len(
    re.findall(
        r"^(?:async )?def test_",
        Path(importlib.util.find_spec(f"{SUITE}.test_conformance").origin).read_text(),
        re.M,
    )
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty third-party project, plus a distribution whose only content is the plugin's
    pytest11 entry point (what installing asyncfabric registers), on the path of its runs."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    dist = tmp_path / "site" / "af_conformance_ep-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: af-conformance-ep\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{PLUGIN} = {PLUGIN}\n")
    return tmp_path


def _pytest(project: Path, *args: str, autoload: bool = True, env: dict | None = None):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ASYNCFABRIC_CONF"))}
    e["PYTHONPATH"] = os.pathsep.join([str(project / "site"), e.get("PYTHONPATH", "")])
    if not autoload:
        e["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    e.update(env or {})
    cmd = [sys.executable, "-m", "pytest", "-p", "anyio", "-p", "no:cacheprovider", "-rA"]
    cmd += ["--rootdir", str(project), "-c", str(project / "pytest.ini"), *args]
    r = subprocess.run(cmd, cwd=project, env=e, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def _counts(out: str) -> dict[str, int]:
    """The outcome counts of pytest's last summary line ("=== 2 passed, 1 error in 3.1s ===")."""
    tail = re.findall(r"^=+ (.*) in [\d.]+s", out, re.M)[-1]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", tail)}


def test_an_unusable_spec_fails_and_never_skips(project):
    rc, out = _pytest(project, "--pyargs", SUITE, "--af-conformance=nosuch")  # by entry point
    assert rc == 1, out
    counts = _counts(out)
    assert counts.get("errors", 0) + counts.get("failed", 0) == N_TESTS, out
    assert "skipped" not in counts and "passed" not in counts, out
    assert (
        "'nosuch' was asked for (by --af-conformance) but cannot be used here: "
        "unknown provider 'nosuch'" in out
    ), out
    assert "asyncfabric conformance: nosuch (named by --af-conformance)" in out  # the header
    rc, out = _pytest(project, "--pyargs", SUITE, env={"ASYNCFABRIC_CONFORMANCE": "nosuch"})
    assert rc == 1 and "named by ASYNCFABRIC_CONFORMANCE" in out, out


def test_a_third_party_backend_runs_it_with_p(project):
    """Plugin autoloading off: ``-p`` loads it (and the anyio plugin must be there too)."""
    args = ["--pyargs", SUITE, "--af-conformance=example", "-k", "semantics or bad_input"]
    rc, out = _pytest(project, "-p", PLUGIN, *args, autoload=False)
    assert rc == 0, out
    assert _counts(out) == {"passed": 2, "deselected": N_TESTS - 2}, out
    assert "PASSED test_conformance.py::test_bad_input[example]" in out, out


def test_the_plugin_is_inert_elsewhere_and_registers_once(project):
    """Autoloaded by its entry point and named by ``-p`` at once: one registration; a test
    of another project, with fixtures of the suite's names, runs untouched."""
    (project / "test_other.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef spec():\n    return 'mine'\n\n"
        "def test_mine(spec):\n    assert spec == 'mine'\n"
    )
    rc, out = _pytest(project, "-p", PLUGIN, "test_other.py")
    assert rc == 0, out
    assert _counts(out) == {"passed": 1}, out
    assert "asyncfabric conformance" not in out  # no header unless a run names specs
