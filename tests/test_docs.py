"""The documentation builds without a warning, covers the API, and its code runs.

The build is the one of ``docs/conf.py``'s docstring: warnings are errors and
every cross-reference must resolve (``-n``), so a docstring with broken
reStructuredText or a reference to a name that does not exist fails here. The
code blocks of the guides run as written, one namespace per page (a page reads
like a notebook); the examples of the docstrings run as doctests
(``--doctest-modules`` over ``sam_optax``).
"""

import inspect
import pathlib
import re
import subprocess
import sys
import zlib

import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def html(tmp_path_factory):
  out = tmp_path_factory.mktemp("html")
  build = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", "-q",
       str(DOCS), str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert build.returncode == 0, build.stderr
  return out


def documented_objects(html_dir):
  """``{name: role}`` of every Python object the build documented (objects.inv)."""
  data = (html_dir / "objects.inv").read_bytes()
  body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
  objects = {}
  for line in body.splitlines():
    name, role = line.split(" ", 2)[:2]
    if role.startswith("py:"):
      objects[name] = role
  return objects


def test_docs_build_and_every_public_name_has_an_api_entry(html):
  objects = documented_objects(html)
  missing = [name for name in sam_optax.__all__ if f"sam_optax.{name}" not in objects]
  assert not missing, f"add these names to docs/api.rst: {missing}"
  for name in sam_optax.__all__:
    role = objects[f"sam_optax.{name}"]
    value = getattr(sam_optax, name)
    expected = ("py:module" if inspect.ismodule(value) else
                "py:class" if inspect.isclass(value) else
                "py:function" if inspect.isfunction(value) else "py:data")
    assert role == expected, (name, role)
  api = (html / "api.html").read_text()
  # Every name is placed with its family in docs/api.rst, none left to the catch-all.
  assert "Other public names" not in api, "place the new names in a section of docs/api.rst"
  sam_entry = api.split('id="sam_optax.sam"')[1].split('id="sam_optax.usam"')[0]
  assert 'class="math notranslate' in sam_entry  # the formula, rendered by MathJax
  assert "Foret et al." in sam_entry and "&gt;&gt;&gt;" in sam_entry  # reference, example


def test_included_results_are_on_their_pages(html):
  benchmarks = (html / "results" / "benchmarks.html").read_text()
  assert "flops × SGD" in benchmarks and "benchmark-cpu.png" in benchmarks
  assert (html / "_images" / "benchmark-cpu.png").exists()
  mnist1d = (html / "results" / "mnist1d.html").read_text()
  assert "gsam" in mnist1d and (html / "_images" / "learning_curves.png").exists()


def test_every_public_function_has_a_runnable_example():
  without = [name for name in sam_optax.__all__
             if inspect.isfunction(getattr(sam_optax, name))
             and ">>>" not in (inspect.getdoc(getattr(sam_optax, name)) or "")]
  assert not without, f"these public functions have no doctest example: {without}"


def code_blocks(page):
  return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_guides_have_code():
  assert sum(len(code_blocks(page)) for page in PAGES) >= 10


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p)],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_code_on_page_runs(page):
  namespace = {"__name__": f"docs.{page.stem}"}
  for number, block in enumerate(code_blocks(page)):
    code = compile(block, f"{page.relative_to(ROOT)} (python block {number})", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
