"""Sphinx configuration: Markdown pages (MyST), API reference from the docstrings."""

import vaepriors

project = "vaepriors"
author = "the vaepriors developers"
release = vaepriors.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
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
