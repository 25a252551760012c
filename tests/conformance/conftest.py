"""The packaged conformance suite's asserts are rewritten here too (it is imported, not collected)."""

import pytest

pytest.register_assert_rewrite("asyncfabric.testing.conformance.test_conformance")
