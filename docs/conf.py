"""Sphinx configuration: the user manual of cupystreams.

Built by ``make docs`` (HTML, warnings are errors) and ``make doctest`` (runs
every ``testcode`` example on the host backend). Pages are Markdown (MyST);
the API reference is autodoc over Google-style docstrings (Napoleon). The
frameworks the adapters import, and CuPy, are mocked, so the manual builds on
a machine that has none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cupystreams  # the installed package (``make docs`` installs it editable)

if TYPE_CHECKING:
    from sphinx.application import Sphinx

project = "cupystreams"
author = "the cupystreams authors"
copyright = "the cupystreams authors, MIT License"
release = version = cupystreams.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3

# -- API reference -------------------------------------------------------------
autodoc_mock_imports = ["cupy", "jax", "numba", "torch"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Types named in signatures that have no page of their own here: the standard
# library's and NumPy's (no network for intersphinx in CI), the backend seam
# (internal), and the mocked frameworks.
nitpick_ignore_regex = [
    (r"py:.*", r"(collections\.abc|typing|types|contextlib|threading|os|numpy|np)\..*"),
    (r"py:class", r"(Hashable|Callable|Iterator|Any|TracebackType|np\.ndarray|numpy\.ndarray)"),
    (r"py:class", r"(Backend|cupystreams\._.*|cupystreams\.adapters\.\w+\._.*)"),
    (r"py:.*", r"(cupy|torch|jax|numba)(\..*)?"),
]

# -- examples ------------------------------------------------------------------
# Every example without "# needs a GPU" runs here, on the host backend.
doctest_global_setup = """
import os
os.environ["CUPYSTREAMS_BACKEND"] = "host"
"""
doctest_test_doctest_blocks = ""

# -- HTML ----------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"cupystreams {release}"
html_theme_options = {
    "description": "A CUDA stream and event pool for Python",
    "fixed_sidebar": True,
}


def setup(app: Sphinx) -> None:
    """Read the docstring of a property or an attribute as a method's.

    Napoleon takes the text before the first colon of such a docstring
    for its type (Google style's "int: The count."); the library's properties
    open with a sentence instead ("The backend's name: ``"cupy"`` or ...").
    """
    from sphinx.ext import napoleon

    for listener in list(app.events.listeners["autodoc-process-docstring"]):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)

    def process(app: Sphinx, what: str, *args: Any) -> None:
        as_what: Any = "method" if what in ("property", "attribute") else what
        napoleon._process_docstring(app, as_what, *args)

    app.connect("autodoc-process-docstring", process)
