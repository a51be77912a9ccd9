"""Invariants shared by every public constructor, after optax's ``_common_test``.

``ROWS`` lists each public constructor of ``sam_optax`` once, with how to
build it on a tiny logistic-regression problem. Every row gets, with
hypothesis-generated params and batches:

* ρ = 0 returns the incoming gradient, the base update (SAF and MESA, which
  have no ρ, pass it through; CSAM with γ = 0, whose descent loss is then the
  cross-entropy; BSAM with ρ_max = ρ_min = 0 gives ``g + (g − ‖g‖/(‖g‖+δ) g)
  ≈ g``; GSAM's ``g⊥`` vanishes);
* a learning rate of 0 leaves the parameters unchanged (so every update is
  finite), with momentum SGD and with AdamW as the base;
* a zero incoming gradient gives finite updates, never NaN;
* float32 and bfloat16 parameters give updates of their dtype, bfloat16 close
  to the float32 run;
* results are identical with and without jit;

and, on fixed inputs: one trace per jitted training step
(``chex.assert_max_traces(n=1)``); per-device ascent under ``jax.pmap`` on
8 fake devices, each device fed its own shard, equals a loop over the shards
(and differs from one synchronized perturbation: m-sharpness), and equals
``Splits(8)`` on one device; the
synchronized perturbation under ``pmap`` equals the single-device step on the
global batch; the radius and ``eps`` errors at construction.

Adding a method: one row here (and its NumPy reference test). The other
tables of the tests (``sam_cases.py``) derive from ``ROWS``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _numerics, _parallel

N, D, CLASSES = 8, 3, 3
DEVICES = 8
AXIS = "data"
# Hyperparameters of the rows (the reference tests use the same).
RHO, ASAM_RHO, ETA, ALPHA, RHO_MAX, RHO_MIN, GAMMA = 0.1, 0.5, 0.01, 0.3, 0.1, 0.05, 1.0


def logits_fn(params, batch):
  return batch["x"] @ params["kernel"] + params["bias"], batch["y"]


def per_example_loss(params, batch):
  return optax.softmax_cross_entropy_with_integer_labels(*logits_fn(params, batch))


def loss_fn(params, batch):
  return per_example_loss(params, batch).mean()


# --------------------------------------------------------------------------
# The table: one row per public constructor.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiny:
  """The problem a row is built for: its losses and its size."""

  loss_fn: Callable[..., Any]
  logits_fn: Callable[..., Any] | None = None
  per_example_loss: Callable[..., Any] | None = None
  num_examples: int = N
  num_classes: int = CLASSES


TINY = Tiny(loss_fn, logits_fn, per_example_loss)


@dataclasses.dataclass(frozen=True)
class Row:
  """A public constructor and how to use it on a tiny problem.

  Attributes:
    name: the constructor's name in ``sam_optax``.
    make: ``make(problem, perturbation=None, **overrides)`` builds the
      transform for a :class:`Tiny` problem; ``overrides`` sets a radius
      (see ``radii``) or ``eps``.
    radii: the radius keywords of ``make``; ρ = 0 sets them all to 0.
    zero: further keywords of the ρ = 0 build (CSAM's γ = 0, ESAM's γ = 1).
    eps: whether ``make`` takes ``eps``.
    per_device: whether the row takes a perturbation option (so it has a
      per-device ascent under ``pmap``).
    synced_is_global: whether ``Synced`` under ``pmap`` is the step on the
      global batch (not ESAM's: it selects examples per device).
    stable: whether it rescales to the norm of the incoming gradient.
    inner_reports: ``(name, keywords)``: the keywords that ``make`` hands to
      an inner method the user built, whose errors name that method (the
      wrappers' inner ``sam``, stable_sam's inner ``usam``); the errors of
      the others name the row.
    update_args: ``update_args(params, batch)``, the extra arguments of
      ``update``.
  """

  name: str
  make: Callable[..., optax.GradientTransformation]
  radii: tuple[str, ...] = ("rho",)
  zero: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eps: bool = True
  per_device: bool = True
  synced_is_global: bool = True
  stable: bool = False
  inner_reports: tuple[str, tuple[str, ...]] = ("", ())
  update_args: Callable[[Any, Any], dict] = lambda params, batch: {"batch": batch}

  def build(self, problem: Tiny = TINY, **kwargs):
    return self.make(problem, **kwargs)

  def build_zero(self, problem: Tiny = TINY):
    return self.make(problem, **{name: 0.0 for name in self.radii}, **self.zero)

  def error_prefix(self, argument: str) -> str:
    """The start of the error for a bad ``argument``: ``"<constructor>: "``,
    anchored (``match`` searches, and "sam: rho" is found in "fsam: rho")."""
    inner, keywords = self.inner_reports
    return "^" + re.escape(inner if argument in keywords else self.name) + ": "


def _axis(perturbation):
  return None if perturbation is None else perturbation.axis_name


def _method(constructor, loss=("loss_fn", "loss_fn"), **fixed):
  """A row's ``make``: ``constructor(**fixed)`` with the problem's loss
  ``loss = (keyword, attribute of the problem)``."""
  keyword, attribute = loss
  def make(problem, perturbation=None, **kw):
    return constructor(**{**fixed, keyword: getattr(problem, attribute),
                          "perturbation": perturbation, **kw})
  return make


def _wrapper(wrap):
  """A row's ``make`` for ``wrap(sam(0.1, ...), axis_name)``."""
  def make(problem, perturbation=None, rho=0.1, eps=_numerics.DEFAULT_EPS):
    inner = sam_optax.sam(rho, loss_fn=problem.loss_fn, perturbation=perturbation, eps=eps)
    return wrap(inner, _axis(perturbation))
  return make


def _stable_sam(problem, perturbation=None, rho=0.1, eps=_numerics.DEFAULT_EPS):
  inner = sam_optax.usam(rho, loss_fn=problem.loss_fn, perturbation=perturbation)
  return sam_optax.stable_sam(inner, axis_name=_axis(perturbation), eps=eps)


def _saf_args(params, batch):
  return {"logits": logits_fn(params, batch)[0], "example_index": jnp.arange(N)}


ROWS = [
    Row("sam", _method(sam_optax.sam, rho=RHO)),
    Row("usam", _method(sam_optax.usam, rho=RHO)),
    Row("asam", _method(sam_optax.asam, rho=ASAM_RHO, eta=ETA)),
    Row("gsam", _method(sam_optax.gsam, rho=RHO, alpha=ALPHA)),
    Row("bsam", _method(sam_optax.bsam, rho_max=RHO_MAX, rho_min=RHO_MIN),
        radii=("rho_max", "rho_min")),
    Row("csam", _method(sam_optax.csam, ("logits_fn", "logits_fn"), rho=RHO, gamma=GAMMA),
        zero={"gamma": 0.0}),
    Row("esam", _method(sam_optax.esam, ("loss_fn", "per_example_loss"), rho=0.1, beta=0.5, gamma=0.5,
                        seed=3),
        zero={"gamma": 1.0}, synced_is_global=False),
    Row("looksam", _method(sam_optax.looksam, rho=0.1, k=2, alpha=0.7)),
    Row("fsam", _method(sam_optax.fsam, rho=RHO, sigma=1.0, lmbda=0.9)),
    Row("vasso", _method(sam_optax.vasso, rho=RHO, theta=0.4)),
    Row("wsam", _method(sam_optax.wsam, rho=RHO, gamma=0.7)),
    # An identity base with learning rate -1 makes the decoupled update the
    # coupled surrogate g + α(g̃ − g), so every invariant applies.
    Row("wsam_decoupled", _method(sam_optax.wsam_decoupled, base_optimizer=optax.identity(),
                                  learning_rate=-1.0, rho=RHO, gamma=0.7)),
    # The whole optimizer around an identity base; it takes no loss (one gradient).
    Row("msam", lambda problem, perturbation=None, **kw: sam_optax.msam(
        optax.identity(), **{"rho": RHO, "perturbation": perturbation, **kw}),
        per_device=False),
    Row("gcsam", _method(sam_optax.gcsam, rho=RHO)),
    # The whole optimizer around an identity base; λ = 0 with ρ = 0 is the
    # gradient at w (both gradients take the current batch without
    # previous_args); it refuses the per-device options.
    Row("sampa", _method(sam_optax.sampa, base_optimizer=optax.identity(), rho=RHO, lam=0.2),
        zero={"lam": 0.0}, per_device=False),
    Row("interval_sam", _method(sam_optax.interval_sam, rho=0.1, k=2)),
    # Seed 3 draws a perturbed step 0 (the per-device test looks at step 0).
    Row("stochastic_sam", _method(sam_optax.stochastic_sam, rho=0.1, p=0.5, seed=3)),
    Row("every_k", _wrapper(lambda inner, axis: sam_optax.every_k(inner, 2, axis_name=axis)),
        inner_reports=("sam", ("rho", "eps"))),
    Row("with_probability", _wrapper(lambda inner, axis: sam_optax.with_probability(
        inner, 0.5, seed=3, axis_name=axis)), inner_reports=("sam", ("rho", "eps"))),
    Row("stable_sam", _stable_sam, stable=True, inner_reports=("usam", ("rho",))),
    Row("saf", lambda problem: sam_optax.saf(
        problem.num_examples, problem.num_classes, steps_per_epoch=1, start_epoch=1,
        past_epochs=1),
        radii=(), eps=False, per_device=False, update_args=_saf_args),
    Row("mesa", lambda problem: sam_optax.mesa(steps_per_epoch=1, start_epoch=0),
        radii=(), eps=False, per_device=False, update_args=lambda params, batch: {}),
]
ROWS_BY_NAME = {row.name: row for row in ROWS}
NAMES = [row.name for row in ROWS]
PER_DEVICE = [row.name for row in ROWS if row.per_device]


def test_every_public_constructor_has_a_row():
  constructors = {
      name for name in sam_optax.__all__
      if callable(getattr(sam_optax, name)) and not isinstance(getattr(sam_optax, name), type)
      and name not in ("accumulated_grad", "not_a_bias", "rho_schedule_from_lr", "saf_check",
                       "takes_ascent_step",
                       "saf_target",
                       "mesa_params", "mesa_model_state", "mesa_target",
                       "msam_eval_params")
  }
  assert constructors == set(ROWS_BY_NAME)


# --------------------------------------------------------------------------
# Properties over generated inputs.
# --------------------------------------------------------------------------

SETTINGS = hypothesis.settings(
    max_examples=10, deadline=None, database=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    # Shrinking re-runs the eager path hundreds of times; the failing example
    # is reported as generated.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])


def _floats(shape, bound=2.0):
  return hnp.arrays(np.float32, shape,
                    elements=st.floats(-bound, bound, width=32, allow_subnormal=False))


PARAMS = st.fixed_dictionaries({"kernel": _floats((D, CLASSES)), "bias": _floats((CLASSES,))})
BATCH = st.fixed_dictionaries({
    "x": _floats((N, D)),
    "y": hnp.arrays(np.int32, (N,), elements=st.integers(0, CLASSES - 1)),
})


def _update(row, tx, grads, state, params, batch):
  return tx.update(grads, state, params, **row.update_args(params, batch))


def _evaluate(row: Row, params, batch, *, full: bool = True):
  """Everything the properties look at, for one row, params and batch.

  ``full=False`` computes only the surrogate gradient and the update at a
  zero gradient (the bf16 property), to keep each compiled program small.
  """
  grads = jax.grad(loss_fn)(params, batch)
  out = {"grads": grads}
  tx = row.build()
  out["surrogate"] = _update(row, tx, grads, tx.init(params), params, batch)[0]
  zeros = jax.tree.map(jnp.zeros_like, grads)
  out["zero_grad"] = _update(row, tx, zeros, tx.init(params), params, batch)[0]
  if not full:
    return out

  zero = row.build_zero()
  out["rho_zero"] = _update(row, zero, grads, zero.init(params), params, batch)[0]
  for base_name, base in [("sgd", optax.sgd(0.0, momentum=0.9)),
                          ("adamw", optax.adamw(0.0, weight_decay=0.1))]:
    chained = optax.chain(row.build(), base)
    updates, _ = _update(row, chained, grads, chained.init(params), params, batch)
    out[f"lr_zero_{base_name}"] = optax.apply_updates(params, updates)
  return out


@functools.cache
def jitted(name: str, full: bool = True):
  """One compiled evaluation per row (and per input dtype, by jax's cache)."""
  return jax.jit(functools.partial(_evaluate, ROWS_BY_NAME[name], full=full))


def _assert_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_rho_zero_returns_the_incoming_gradient(name, params, batch):
  out = jitted(name)(params, batch)
  # GSAM, BSAM and StableSAM deviate from g by terms of order δ/‖g‖.
  _assert_close(out["rho_zero"], out["grads"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_learning_rate_zero_leaves_params_unchanged(name, params, batch):
  out = jitted(name)(params, batch)
  for base in ("sgd", "adamw"):
    jax.tree.map(np.testing.assert_array_equal, out[f"lr_zero_{base}"], params)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_zero_gradient_gives_finite_updates(name, params, batch):
  out = jitted(name)(params, batch)
  for leaf in jax.tree.leaves(out["zero_grad"]):
    assert np.all(np.isfinite(leaf)), (name, out["zero_grad"])
  if ROWS_BY_NAME[name].stable:
    # ‖g‖ = 0 rescales the surrogate to zero.
    jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), out["zero_grad"])


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_jit_and_eager_agree(name, params, batch):
  row = ROWS_BY_NAME[name]
  eager = _evaluate(row, params, batch, full=False)
  compiled = jitted(name, full=False)(params, batch)
  # XLA may fuse and reorder float32 arithmetic under jit: a few ulps, of the
  # largest terms that enter a component (GSAM's g_p − α g⊥ and BSAM's
  # g + g_max − r·g_min cancel), so the absolute part scales with the norms.
  scale = float(optax.tree.norm(eager["surrogate"]) + optax.tree.norm(eager["grads"]))
  _assert_close(compiled["surrogate"], eager["surrogate"], rtol=1e-6, atol=2e-6 * scale)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_bfloat16_params(name, params, batch):
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  # The float32 run starts from the same (bf16-representable) values.
  params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params16)
  out16 = jitted(name, full=False)(params16, batch)
  out32 = jitted(name, full=False)(params32, batch)
  for leaf in jax.tree.leaves(out16["surrogate"]) + jax.tree.leaves(out16["zero_grad"]):
    assert leaf.dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(out32["surrogate"]) + jax.tree.leaves(out32["zero_grad"]):
    assert leaf.dtype == jnp.float32
  # bf16 keeps 8 significant bits: the ascent point and every output are
  # rounded to ~0.4 %; allow a few of those relative to the gradient's size.
  scale = float(optax.tree.norm(out32["surrogate"])) + float(optax.tree.norm(out32["grads"]))
  difference = float(_numerics.global_norm(jax.tree.map(
      lambda a, b: jnp.asarray(a, jnp.float32) - b, out16["surrogate"], out32["surrogate"])))
  assert difference <= 0.05 * scale + 1e-3, (difference, scale)


# --------------------------------------------------------------------------
# Fixed inputs: tracing, data parallelism, construction errors.
# --------------------------------------------------------------------------


def _fixed_problem(n=N):
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.asarray(rng.normal(size=(D, CLASSES)) * 0.5, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(CLASSES,)) * 0.1, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, CLASSES, size=n), jnp.int32)}
  return params, batch


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_is_traced_once(name):
  row = ROWS_BY_NAME[name]
  tx = optax.chain(row.build(), optax.sgd(0.1, momentum=0.9))
  params, batch = _fixed_problem()
  chex.clear_trace_counter()  # the count is kept per function name

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = _update(row, tx, grads, state, params, batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state, batch)
  for leaf in jax.tree.leaves(params):
    assert np.all(np.isfinite(leaf))


def _shards(tree):
  return jax.tree.map(lambda x: x.reshape((DEVICES, -1) + x.shape[1:]), tree)


@pytest.mark.parametrize("name", PER_DEVICE)
def test_per_device_ascent_under_pmap_equals_a_loop_over_the_shards(name):
  """Each device is fed its own shard (not chex's ``with_pmap``, which gives
  every device the same arguments) and perturbs with its own gradient."""
  assert jax.device_count() >= DEVICES, "the root conftest sets 8 CPU devices"
  row = ROWS_BY_NAME[name]
  params, batch = _fixed_problem(2 * DEVICES)
  tx = row.build(perturbation=sam_optax.PerDevice(AXIS))

  def local(params, shard):
    grads = jax.grad(loss_fn)(params, shard)  # the local, un-averaged gradient
    return _update(row, tx, grads, tx.init(params), params, shard)[0]

  out = jax.pmap(local, axis_name=AXIS, in_axes=(None, 0))(params, _shards(batch))
  for leaf in jax.tree.leaves(out):  # every device holds the same average
    np.testing.assert_allclose(leaf, jnp.broadcast_to(leaf[0], leaf.shape),
                               rtol=1e-6, atol=1e-7)
  got = jax.tree.map(lambda x: x[0], out)

  def single_device(part, method=None):
    method = row.build() if method is None else method
    grads = jax.grad(loss_fn)(params, part)
    return jax.jit(method.update)(grads, method.init(params), params,
                                  **row.update_args(params, part))[0]

  parts = [jax.tree.map(lambda x, i=i: x[i], _shards(batch)) for i in range(DEVICES)]
  if row.stable:
    # StableSAM rescales the *averaged* inner surrogate to the norm of the
    # averaged gradient (the whole batch's), not each shard's.
    inner = jax.tree.map(lambda *a: np.mean(a, axis=0),
                         *[single_device(part, sam_optax.usam(0.1, loss_fn=loss_fn)) for part in parts])
    scale = optax.tree.norm(jax.grad(loss_fn)(params, batch)) / optax.tree.norm(inner)
    want = jax.tree.map(lambda a: a * scale, inner)
  else:
    want = jax.tree.map(lambda *a: np.mean(a, axis=0), *[single_device(p) for p in parts])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)
  # Splits(8) on one device: the same groups, the same step.
  split = single_device(batch, row.build(perturbation=sam_optax.Splits(DEVICES)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), split, got)
  # m-sharpness matters: per-device differs from the synchronized perturbation.
  sync = single_device(batch)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(got), jax.tree.leaves(sync))) > 1e-4


# The accumulation options a row refuses at construction (the reason is in
# the message; tests/test_accumulation.py checks the texts).
REFUSES = {"looksam": "Splits(sequential=True)", "esam": "MicroBatches"}
# The accumulation mechanics live in the skeleton; a rule meets them through
# its state (Ascent.mean), its number of re-evaluations and its gradient
# factories. One row per such kind (the others repeat a path: usam, asam and
# wsam are sam's stateless one-re-evaluation rule; vasso is fsam's affine
# EMA; interval_sam, stochastic_sam and with_probability are every_k's cond).
ACCUMULATING = [name for name in PER_DEVICE if name not in (
    "usam", "asam", "wsam", "vasso", "interval_sam", "stochastic_sam", "with_probability")]


@pytest.mark.parametrize("name", ACCUMULATING)
def test_gradient_accumulation_options(name):
  """``Splits(4, sequential=True)`` gives the numbers of the vectorized
  ``Splits(4)``, new state included; ``MicroBatches(4)`` with the
  accumulated gradient gives the step on the whole batch (new state
  included), for every method that takes ``perturbation=``."""
  row = ROWS_BY_NAME[name]
  params, batch = _fixed_problem(2 * DEVICES)
  options = {"vectorized": sam_optax.Splits(4), "sequential": sam_optax.Splits(4, sequential=True),
             "micro": sam_optax.MicroBatches(4), "whole": None}
  txs = {}
  for key, option in options.items():
    if REFUSES.get(name) == _parallel.kind_of(option):
      with pytest.raises(ValueError, match=f"^{re.escape(name)}: perturbation=.* is not supported: "):
        row.build(perturbation=option)
      continue
    txs[key] = row.build(perturbation=option)

  @jax.jit
  def one_step(params):
    grads = jax.grad(loss_fn)(params, batch)
    accumulated = sam_optax.accumulated_grad(loss_fn, 4)(params, batch=batch)
    return {key: _update(row, tx, accumulated if key == "micro" else grads, tx.init(params),
                         params, batch) for key, tx in txs.items()}

  out = one_step(params)
  close = functools.partial(chex.assert_trees_all_close, rtol=2e-5, atol=1e-6)
  if "sequential" in out:
    close(out["sequential"], out["vectorized"])
  if "micro" in out:
    close(out["micro"], out["whole"])


SYNCED = [row.name for row in ROWS if row.per_device and row.synced_is_global]


@pytest.mark.parametrize("name", SYNCED)
def test_synced_perturbation_under_pmap_equals_the_step_on_the_global_batch(name):
  row = ROWS_BY_NAME[name]
  params, batch = _fixed_problem(2 * DEVICES)
  tx = row.build(perturbation=sam_optax.Synced(AXIS))

  def local(params, shard):
    grads = jax.grad(loss_fn)(params, shard)
    return _update(row, tx, grads, tx.init(params), params, shard)[0]

  got = jax.tree.map(lambda x: x[0], jax.pmap(local, axis_name=AXIS, in_axes=(None, 0))(
      params, _shards(batch)))
  single = row.build()
  grads = jax.grad(loss_fn)(params, batch)
  want = jax.jit(single.update)(grads, single.init(params), params,
                                **row.update_args(params, batch))[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)


NAN, INF = math.nan, math.inf
WITH_RADII = [(row.name, radius) for row in ROWS for radius in row.radii]


@pytest.mark.parametrize("value", [-0.05, NAN, INF, -INF])
@pytest.mark.parametrize("name, radius", WITH_RADII, ids=[f"{n}-{r}" for n, r in WITH_RADII])
def test_bad_radius(name, radius, value):
  row = ROWS_BY_NAME[name]
  with pytest.raises(ValueError, match=row.error_prefix(radius)
                     + rf"{radius} must be finite and >= 0, got {radius}="):
    row.build(**{radius: value})


@pytest.mark.parametrize("value", [0.0, -1e-12, NAN, INF])
@pytest.mark.parametrize("name", [row.name for row in ROWS if row.eps])
def test_eps_must_be_positive(name, value):
  row = ROWS_BY_NAME[name]
  with pytest.raises(ValueError, match=row.error_prefix("eps")
                     + r"eps must be finite and > 0, got eps="):
    row.build(eps=value)
