"""The package as users get it: built, installed from its wheel, type-checked.

The rest of the suite runs on the editable install of the checkout; these
tests build the sdist and the wheel from a copy of the package's files (so
nothing is written into the checkout), check the metadata as PyPI would
(``twine check --strict``), install the wheel into a fresh virtual environment
with nothing but its declared dependencies, and run a SAM step there.
"""

import email
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = {"jax", "optax", "chex"}

SAM_STEP = """
import importlib.util, pathlib, sys
import jax, jax.numpy as jnp, optax, sam_optax
assert pathlib.Path(sam_optax.__file__).is_relative_to(sys.prefix), sam_optax.__file__
for extra in ("flax", "tensorflow", "orbax", "matplotlib", "pytest"):
  assert importlib.util.find_spec(extra) is None, extra
loss_fn = lambda params, batch: jnp.mean((batch[0] @ params - batch[1]) ** 2)
x = jax.random.normal(jax.random.key(0), (16, 3))
batch, params = (x, x @ jnp.array([1.0, -2.0, 0.5])), jnp.zeros(3)
tx = optax.chain(sam_optax.sam(0.05, loss_fn=loss_fn), optax.sgd(0.1))
updates, _ = tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params, batch=batch)
assert loss_fn(optax.apply_updates(params, updates), batch) < loss_fn(params, batch)
print(sam_optax.__version__)
"""


def run(*command, cwd, timeout=300):
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
  assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
  return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  """The sdist and the wheel built (the wheel from the sdist) by ``python -m build``."""
  source = tmp_path_factory.mktemp("source")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  shutil.copytree(ROOT / "sam_optax", source / "sam_optax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  out = tmp_path_factory.mktemp("dist")
  run(sys.executable, "-m", "build", "--outdir", str(out), str(source), cwd=source)
  return out


def wheel_of(dist):
  (wheel,) = dist.glob("*.whl")
  return wheel


def test_metadata_passes_twine_check(dist):
  assert len(list(dist.glob("*.tar.gz"))) == 1
  run(sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir()), cwd=dist)


def test_wheel_holds_the_library_typed_with_core_dependencies(dist):
  with zipfile.ZipFile(wheel_of(dist)) as wheel:
    names = wheel.namelist()
    metadata = email.message_from_string(
        wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
  assert "sam_optax/py.typed" in names
  assert {name.split("/")[0] for name in names} == {
      "sam_optax", f"sam_optax-{sam_optax.__version__}.dist-info"}  # no experiments/, tests/
  assert metadata["Version"] == sam_optax.__version__
  requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
  assert {req.name for req in requirements if req.marker is None} == CORE  # the rest: extras
  assert all("extra" in str(req.marker) for req in requirements if req.marker is not None)


def test_version_is_set_in_one_place():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"]
  assert project["project"]["dynamic"] == ["version"]
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "sam_optax.__version__"}


def test_wheel_installs_in_a_fresh_venv_and_takes_a_sam_step(dist, tmp_path):
  venv = tmp_path / "venv"
  run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
  python = venv / "bin" / "python"
  # This environment's pip installs into the new one (no pip bootstrap there);
  # --no-compile skips byte-compiling jax and scipy, the slow part.
  run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
      str(wheel_of(dist)), cwd=tmp_path)
  # -I: neither the checkout nor PYTHONPATH is on sys.path, only the venv.
  assert run(str(python), "-I", "-c", SAM_STEP, cwd=tmp_path).strip() == sam_optax.__version__


def test_package_type_checks_with_mypy(tmp_path):
  out = run(sys.executable, "-m", "mypy", "-p", "sam_optax", "--cache-dir", str(tmp_path),
            cwd=ROOT)
  assert "Success: no issues found" in out
