"""The library's layout rules, checked on the source (no import, no JAX).

* No module of ``sam_optax`` reaches into another module's private
  (``_underscore``) names: what is shared gets a public name in its module.
* Nothing outside ``sam_optax/`` that ships with the project (``experiments/``,
  ``benchmarks/``, ``docs/``) imports a private ``sam_optax._module``: they
  use the public API, as a user would.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "sam_optax"


def _sources(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(path for path in folder.rglob("*.py") if "_build" not in path.parts)


def _is_module(dotted: str) -> bool:
  """Whether ``sam_optax.a.b`` is a module or package of the library."""
  path = ROOT.joinpath(*dotted.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _module_aliases(tree: ast.Module) -> set[str]:
  """Names bound to a library module by ``from sam_optax[.pkg] import _x``."""
  aliases = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sam_optax":
      aliases.update(alias.asname or alias.name for alias in node.names
                     if _is_module(f"{node.module}.{alias.name}"))
  return aliases


@pytest.mark.parametrize("path", _sources(LIBRARY), ids=lambda path: path.name)
def test_no_module_uses_another_modules_private_names(path):
  tree = ast.parse(path.read_text())
  modules = _module_aliases(tree)
  reached = sorted(
      f"{node.value.id}.{node.attr} (line {node.lineno})"
      for node in ast.walk(tree)
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
      and node.value.id in modules and node.attr.startswith("_"))
  imported = sorted(
      f"{node.module}.{alias.name} (line {node.lineno})"
      for node in ast.walk(tree)
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sam_optax.")
      for alias in node.names
      if alias.name.startswith("_") and not _is_module(f"{node.module}.{alias.name}"))
  assert not reached + imported, (
      f"{path.relative_to(ROOT)} uses private names of other modules: {reached + imported};"
      " give what is shared a public name in its module")


@pytest.mark.parametrize("folder", ["experiments", "benchmarks", "docs"])
def test_nothing_outside_the_library_imports_a_private_module(folder):
  offenders = []
  for path in _sources(ROOT / folder):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "sam_optax":
        names = [alias.name for alias in node.names if alias.name.startswith("_")]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sam_optax."):
        names = [node.module] if node.module.split(".")[1].startswith("_") else []
      elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names
                 if alias.name.startswith("sam_optax.") and alias.name.split(".")[1].startswith("_")]
      else:
        continue
      offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names]
  assert not offenders, (
      f"private sam_optax modules imported outside the library: {offenders}; use the public API")
