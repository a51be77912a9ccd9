"""The README stays true: its test command is CI's, its quick start runs."""

import pathlib
import re

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def setup_commands():
  return re.findall(r"^    (python3 -m venv .*)$", README, flags=re.MULTILINE)


def test_readme_opens_with_two_setup_commands():
  commands = setup_commands()
  assert len(commands) == 2, commands
  main_job, tests = commands
  assert "experiments.compare" in main_job
  assert "pytest" in tests
  assert README.index(main_job) < README.index("## Quick start")


def test_ci_runs_exactly_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert setup_commands()[1] in ci


def test_quick_start_runs_and_trains():
  block = re.search(r"## Quick start\n+```python\n(.*?)```", README, flags=re.DOTALL).group(1)
  namespace = {}
  exec(compile(block, "README quick start", "exec"), namespace)  # pylint: disable=exec-used
  loss_fn, params, batch = namespace["loss_fn"], namespace["params"], namespace["batch"]
  start = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  assert float(loss_fn(params, batch)) < 0.1 * float(loss_fn(start, batch))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
