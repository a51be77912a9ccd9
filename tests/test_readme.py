"""The README stays true: its test command is CI's, its quick start runs."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


class _Linear:
  """A stand-in for a Flax model: ``apply(params, x, train=...)``."""

  @staticmethod
  def apply(params, x, train=True):
    del train
    return x @ params["kernel"]


def test_saf_training_step_runs_as_written():
  block = re.search(r"## Sharpness-aware training for free.*?```python\n(.*?)```", README,
                    flags=re.DOTALL).group(1)
  n, c, steps_per_epoch = 8, 3, 2
  namespace = {"jax": jax, "optax": __import__("optax"), "sam_optax": __import__("sam_optax"),
               "N": n, "C": c, "S": steps_per_epoch, "lr": 0.1, "model": _Linear}
  exec(compile(block, "README SAF step", "exec"), namespace)  # pylint: disable=exec-used
  tx, train_step = namespace["tx"], namespace["train_step"]
  params = {"kernel": jax.random.normal(jax.random.key(1), (4, c))}
  opt_state = tx.init(params)
  x = jax.random.normal(jax.random.key(0), (n, 4))
  batch = {"x": x[:4], "y": jnp.arange(4) % c, "index": jnp.arange(4) + 2}
  logits = _Linear.apply(params, batch["x"])
  new_params, opt_state = train_step(params, opt_state, batch)
  saf_state = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, namespace["sam_optax"].SAFState))
      if isinstance(s, namespace["sam_optax"].SAFState)][0]
  # Epoch 0's slot: the jitted step's logits against these eager ones (another
  # summation order in the dot: a few ulps of the largest).
  np.testing.assert_allclose(saf_state.bank[0, 2:6], logits, rtol=1e-6,
                             atol=1e-6 * float(np.max(np.abs(logits))))
  assert not np.allclose(new_params["kernel"], params["kernel"])


def test_gradient_accumulation_runs_as_written():
  quick = re.search(r"## Quick start\n+```python\n(.*?)```", README, flags=re.DOTALL).group(1)
  block = re.search(r"## Gradient accumulation.*?```python\n(.*?)```", README,
                    flags=re.DOTALL).group(1)
  namespace = {}
  exec(compile(quick.split("for _ in range")[0], "README quick start", "exec"), namespace)  # pylint: disable=exec-used
  before = namespace["params"]
  exec(compile(block, "README gradient accumulation", "exec"), namespace)  # pylint: disable=exec-used
  assert not np.allclose(namespace["params"]["w"], before["w"])
  sam_optax = namespace["sam_optax"]
  assert isinstance(namespace["micro"], sam_optax.MicroBatches)


def _sam_steps(loss_fn, params, x, y, steps=2, rho=0.05, lr=0.1):
  """SAM with SGD by its formula: ``w ← w − lr ∇L(w + ρ g/‖g‖)``."""
  for _ in range(steps):
    g = jax.grad(loss_fn)(params, x, y)
    norm = optax.tree.norm(g)
    g_tilde = jax.grad(loss_fn)(jax.tree.map(lambda w, d: w + rho * d / norm, params, g), x, y)
    params = jax.tree.map(lambda w, d: w - lr * d, params, g_tilde)
  return params


def test_flax_section_trains_linen_and_nnx_with_the_batch():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  block = re.search(r"## Flax\n.*?```python\n(.*?)```", README, flags=re.DOTALL).group(1)
  namespace = {}
  exec(compile(block, "README Flax", "exec"), namespace)  # pylint: disable=exec-used
  x, y, state = namespace["x"], namespace["y"], namespace["state"]
  # linen: the same init, two SAM steps by the formula.
  start = namespace["model"].init(jax.random.key(0), x)["params"]
  want = _sam_steps(namespace["loss_fn"], start, x, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state.params, want)
  assert int(state.opt_state[0].count) == 2  # the count the README says to read
  # NNX: the same, from the same initial layer.
  start = nnx.state(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), nnx.Param)
  want = _sam_steps(namespace["nnx_loss_fn"], start, x, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               nnx.state(namespace["net"], nnx.Param), want)
  assert int(namespace["optimizer"].opt_state[0].count.value) == 2
  # apply_gradients(grads=...) calls tx.update without the batch: a clear error.
  grads = jax.grad(namespace["loss_fn"])(state.params, x, y)
  with pytest.raises(TypeError, match=r"sam: loss_fn\(params, x, y\) requires \['x', 'y'\],"
                     r" but update\(\) got no extra arguments.*TrainState.apply_gradients"
                     r".*call tx.update yourself \(see README 'Flax'\)"):
    state.apply_gradients(grads=grads)
