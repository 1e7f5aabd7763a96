"""Sphinx configuration: Markdown pages (MyST), API reference from the docstrings."""

import vaepriors

project = "vaepriors"
author = "the vaepriors developers"
copyright = "2026, the vaepriors developers"
release = vaepriors.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # Bundles MathJax into _static/mathjax and points mathjax_path there: the math renders
    # offline, with no script fetched from a CDN.
    "sphinx-mathjax-offline",
    "myst_parser",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_custom_sections = [("Arguments", "params_style"), ("Methods", "params_style")]
# Attributes sections as fields, not as second descriptions of NamedTuple fields.
napoleon_use_ivar = True
html_theme = "furo"
html_title = "vaepriors"
nitpicky = False
