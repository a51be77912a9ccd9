"""Sphinx configuration: API pages from the docstrings, guides in Markdown.

Build locally (from the repository root)::

  python -m sphinx -W --keep-going -n -b html docs docs/_build/html

``tests/test_docs.py`` runs the same build, so a warning fails the suite.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the checkout's sam_optax and experiments

import sam_optax  # pylint: disable=wrong-import-position

project = "sam_optax"
author = "The sam_optax authors"
copyright = "2026, The sam_optax authors"  # pylint: disable=redefined-builtin
release = version = sam_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_typehints = "signature"
# Signatures show the names the code uses, not their expansion.
autodoc_type_aliases = {
    "Radius": "float | optax.Schedule",
}
python_maximum_signature_line_length = 88
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"sam_optax {release}"

# The cross-reference check (-n) resolves every type in a signature. Types of
# other libraries have no page here (no intersphinx: the build is offline), so
# only those are exempt; a sam_optax name that does not resolve still fails.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|chex|numpy|np|jnp|collections\.abc|typing)\..*"),
    # The type of the ``schedule`` field of SAFState and MESAState: internal,
    # not in ``__all__`` (its fields are listed in those states' docstrings).
    (r"py:class", r"(sam_optax\.\w+\.)?TrajectorySchedule"),
]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are documented once, by the class's ``Attributes:``."""
  del app, name, options
  if what == "class" and type(obj).__name__ == "_tuplegetter":
    return True
  return skip


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
