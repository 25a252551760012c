"""Sphinx configuration: Markdown pages (myst-parser) and an API reference from docstrings.

Built offline with warnings as errors by scripts/test.sh:
``python -m sphinx -E -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import asyncfabric

project = "asyncfabric"
author = "asyncfabric developers"
copyright = "asyncfabric developers"
release = asyncfabric.__version__
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Signatures show the names users import (asyncfabric.Engine), not private modules.
add_module_names = False

html_theme = "furo"
html_title = f"asyncfabric {release}"
