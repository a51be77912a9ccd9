"""Sphinx configuration: API pages from the docstrings, guides in Markdown.

Build locally (from the repository root)::

  python -m sphinx -W --keep-going -n -b html docs docs/_build/html

``tests/test_docs.py`` runs the same build, so a warning fails the suite.

The API page is generated from ``sam_optax.__all__``: ``api.rst`` places the
names in sections with the ``api-entries`` directive below, and
``api-entries-rest`` documents every public name no section placed, so a new
name always gets an entry. Every name is documented under its public path
(``sam_optax.sam``), never its module's, so moving the implementation between
modules changes nothing here.
"""

import inspect
import os
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode, nested_parse_with_titles

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
# only those are exempt; sam_optax's own names are resolved by
# _resolve_library_names below, and one that is not found still fails.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|chex|numpy|np|jnp|collections\.abc|typing)\..*"),
]


def _directive_for(value):
  if inspect.ismodule(value):
    return "automodule", ["   :members:"]
  if inspect.isclass(value):
    return "autoclass", ["   :members:"]
  if inspect.isfunction(value):
    return "autofunction", []
  return "autodata", []  # a type alias


class ApiEntries(SphinxDirective):
  """``.. api-entries:: name ...``: a summary table and an entry per public name."""

  optional_arguments = 1000

  title = ""

  def names(self):
    return self.arguments

  def run(self):
    names = self.names()
    unknown = [name for name in names if name not in sam_optax.__all__]
    if unknown:
      raise self.error(f"api-entries: not in sam_optax.__all__: {unknown}")
    self.env.temp_data.setdefault("sam_optax_api_placed", set()).update(names)
    if not names:
      return []
    lines = [self.title, "-" * len(self.title), ""] if self.title else []
    lines += [".. currentmodule:: sam_optax", ""]  # an automodule above changed it
    lines += [".. autosummary::", ""] + [f"   {name}" for name in names] + [""]
    for name in names:
      directive, options = _directive_for(getattr(sam_optax, name))
      lines += [f".. {directive}:: sam_optax.{name}", *options, ""]
    parent = nodes.Element()
    nested_parse_with_titles(self.state, StringList(lines, source=self.get_source_info()[0]),
                             parent, self.content_offset)
    return parent.children


class ApiEntriesRest(ApiEntries):
  """``.. api-entries-rest::``: every public name no ``api-entries`` placed.

  Under the heading "Other public names" (a section at the level of ``-``
  underlines), written only if there is such a name.
  """

  optional_arguments = 0
  title = "Other public names"

  def names(self):
    placed = self.env.temp_data.get("sam_optax_api_placed", set())
    return [name for name in sam_optax.__all__ if name not in placed]


def _resolve_library_names(app, env, node, contnode):
  """Type names in signatures that autodoc could not link.

  A public name (``Perturbation``, or ``sam_optax._parallel.PerDevice`` by the
  module it is defined in) links to its entry ``sam_optax.<name>``; a type
  defined inside the library but not public (``Radius``, ``TrajectorySchedule``)
  is shown as plain text. Anything else stays unresolved, and -n reports it.
  """
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"]
  module, _, name = target.rpartition(".")
  if module and not module.startswith("sam_optax"):
    return None
  entry = env.get_domain("py").objects.get(f"sam_optax.{name}")
  if name in sam_optax.__all__ and entry is not None:
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode)
  modules = [m for m_name, m in list(sys.modules.items())
             if m_name.startswith("sam_optax.") and m_name == (module or m_name)]
  if any(_is_type(getattr(m, name, None)) for m in modules):
    return contnode
  return None


def _is_type(value):
  """A class or a type alias (``float | optax.Schedule``, ``Callable[..., Any]``)."""
  return inspect.isclass(value) or type(value).__module__ in (
      "typing", "types", "collections.abc", "_collections_abc")


def _alias_docstring(app, what, name, obj, options, lines):
  """A public type alias keeps the docstring written under it in its module.

  ``sam_optax.X = ...`` re-exported from a private module has no docstring of
  its own where it is documented (``__init__``), and autodoc would show the
  docstring of its type (``types.UnionType``'s) instead.
  """
  del app, options
  if what != "data" or not name.startswith("sam_optax."):
    return
  short = name.rpartition(".")[2]
  for module_name, module in list(sys.modules.items()):
    if module_name.startswith("sam_optax.") and getattr(module, short, None) is obj:
      doc = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", short))
      if doc:
        lines[:] = list(doc)
        return
  if lines and inspect.getdoc(type(obj)) and lines[0] in inspect.getdoc(type(obj)):
    lines.clear()


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are documented once, by the class's ``Attributes:``."""
  del app, name, options
  if what == "class" and type(obj).__name__ == "_tuplegetter":
    return True
  return skip


def setup(app):
  app.add_directive("api-entries", ApiEntries)
  app.add_directive("api-entries-rest", ApiEntriesRest)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("autodoc-process-docstring", _alias_docstring)
  app.connect("missing-reference", _resolve_library_names)
