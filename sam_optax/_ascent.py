"""The skeleton of the SAM family: a method is its rule.

Every method of the library is "SAM with a difference": it takes the gradient
``g = ∇L(w)`` that the training step already computed, moves to one or more
nearby points ``w + ε``, re-evaluates the gradient there with ``jax.grad`` of
the user's loss, and combines the results into a surrogate gradient for the
base optimizer. :func:`transformation` turns a method's :class:`Rule` into an
``optax.GradientTransformationExtraArgs``: the rule gets ``g``, its state and
an :class:`Ascent` that applies the perturbation mask (:func:`resolve_mask`);
the skeleton checks the inputs, runs the rule under the data-parallel option
(executed in :mod:`sam_optax._parallel`), keeps the state on a step whose
surrogate is not finite (:func:`keep_state_if_not_finite`) and advances the
step count.

The mechanisms it uses live in the modules named for them:
:mod:`sam_optax._checks` (argument validation), :mod:`sam_optax._numerics`
(float32 tree arithmetic), :mod:`sam_optax._loss` (re-evaluating the loss),
:mod:`sam_optax._phase` (methods with a cheap phase) and
:mod:`sam_optax._parallel` (the data-parallel options and accumulation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _checks, _loss, _numerics, _parallel, _phase

class SAMState(NamedTuple):
  """State of every single-step method of the family.

  Attributes:
    count: steps taken; the argument of every ρ schedule.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count


Mask: TypeAlias = Any | Callable[[optax.Params], Any]
"""A pytree of bools like the params (or a prefix of it), or a function of
the params that returns one, as ``optax.masked`` takes."""


def resolve_mask(method: str, mask: Mask | None, params: optax.Params) -> Any:
  """``mask`` as a pytree of bools with the structure of ``params`` (None: all).

  Raises:
    ValueError: if the structure does not match, or no leaf is selected.
    TypeError: if a leaf is not a bool.
  """
  if mask is None:
    return None
  tree = mask(params) if callable(mask) else mask
  try:
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), tree, params)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{method}: mask must be a pytree of bools with the structure of"
        f" params (or a prefix of it), as optax.masked takes: {error}") from None
  leaves = jax.tree.leaves(full)
  for leaf in leaves:
    if not (isinstance(leaf, (bool, np.bool_)) or getattr(leaf, "dtype", None) == np.bool_):
      raise TypeError(
          f"{method}: mask leaves must be bools (True: perturb this leaf), got"
          f" {type(leaf).__name__} {leaf!r}.")
  if leaves and all(leaf is False for leaf in leaves):
    raise ValueError(
        f"{method}: mask selects no parameter, so nothing would be perturbed"
        " (the step would be plain SGD's); select at least one leaf.")
  return full


def _restrict_leaf(leaf: jax.Array, keep: Any) -> jax.Array:
  if isinstance(keep, bool):
    return leaf if keep else jnp.zeros_like(leaf)
  return jnp.where(keep, leaf, jnp.zeros_like(leaf))


@dataclasses.dataclass(frozen=True)
class Ascent:
  """A rule's handle on the neighbourhood of ``w``, built by the skeleton.

  It applies the perturbation mask and the data-parallel option, so a rule
  only says which directions it perturbs along and what it does with the
  gradients it gets back.

  Attributes:
    params: ``w``, the current weights.
    gradient_fn: ``∇L`` at a point (every leaf), the extra arguments bound
      (None for a method that re-evaluates nothing, such as ``msam``).
    mask: a bool pytree like ``params`` (None: every leaf is perturbed).
    eps: δ, added to norms in divisions.
    mean: the average over the groups that perturb separately (the devices
      of :class:`~sam_optax.PerDevice`, the groups of
      :class:`~sam_optax.Splits`; the identity otherwise). A rule with state
      builds its state from averaged values, so that it stays the same on
      every device and group.
  """

  params: optax.Params
  gradient_fn: _loss.GradientFn | None
  mask: Any
  eps: float
  mean: Callable[[Any], Any]

  def restrict(self, tree: Any) -> Any:
    """``m ⊙ tree``: zero on the leaves the mask leaves out."""
    if self.mask is None:
      return tree
    return jax.tree.map(_restrict_leaf, tree, self.mask)

  def normalized(self, tree: Any) -> Any:
    """``m ⊙ tree / (‖m ⊙ tree‖ + δ)`` in float32: the norm over the masked leaves."""
    return _numerics.normalized(self.restrict(tree), self.eps)

  def perturbed_params(self, direction: Any, scale: jax.Array) -> optax.Params:
    """``ŵ = w + scale · m ⊙ direction``, in the parameters' dtypes."""
    return _numerics.ascent_point(self.params, self.restrict(direction), scale)

  def gradient_at(self, direction: Any, scale: jax.Array) -> optax.Updates:
    """``∇L(w + scale · m ⊙ direction)``, the gradient at the perturbed point."""
    if self.gradient_fn is None:
      raise ValueError("this method re-evaluates no gradient (Ascent built without gradient_fn).")
    return self.gradient_fn(self.perturbed_params(direction, scale))


Rule: TypeAlias = Callable[..., tuple[optax.Updates, Any]]
"""A method's rule: the surrogate gradient (and new state) of one step.

``rule(grads, state, ascent, **radii) -> (surrogate, state)``: ``grads`` is ``g``, the gradient the rule perturbs with (per device or per
group under a data-parallel option); ``state`` the method's state (its
``count`` is advanced by the skeleton); ``radii`` each radius of the
method at this step, under its name in the constructor.
"""


GradientFactory: TypeAlias = Callable[[optax.Params, Mapping[str, Any]], _loss.GradientFn]
"""``factory(params, extra_args) -> (w ↦ ∇L(w))`` for one step (or group)."""


def transformation(
    method: str,
    rule: Rule,
    *,
    radii: Mapping[str, _checks.Radius],
    loss_fn: _loss.LossFn | None,
    has_aux: bool,
    perturbation: _parallel.Perturbation | None,
    mask: Mask | None,
    eps: float,
    init: Callable[[optax.Params], Any] | None = None,
    gradient_factory: GradientFactory | None = None,
    ascent_gradient_factory: GradientFactory | None = None,
    split_argnames: Sequence[str] = (),
    phased: bool = False,
    unsupported: Mapping[str, str] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a method of the family from its ``rule``: the one skeleton.

  ``update(g, state, params, **extra_args)`` checks its inputs, binds the
  extra arguments to the loss (``gradient_factory``; default: ``jax.grad``
  of ``loss_fn``), evaluates the radii at ``state.count``, resolves the
  mask, runs ``rule`` as the data-parallel option says
  (:func:`sam_optax._parallel.run_rule`, which says what each option does),
  casts the result to the dtypes of ``g`` and advances ``state.count``.

  Whatever the option, the step's new state is kept only if the surrogate
  is finite (:func:`keep_state_if_not_finite`), and ``update`` refuses, at
  trace time, to run inside ``optax.MultiSteps`` or ``optax.apply_if_finite``
  (:func:`sam_optax._checks.check_not_wrapped`).

  Args:
    method: the constructor's name, for error messages.
    rule: the method's difference from SAM (see :class:`Rule`).
    radii: the radii by name (floats or schedules), checked here.
    loss_fn, has_aux: the user's loss (see :func:`sam_optax.sam`).
    perturbation: the data-parallel option, checked here.
    mask: the perturbation mask (see :func:`resolve_mask`).
    eps: δ, checked here.
    init: ``init(params) -> state``, a NamedTuple with a ``count`` field
      (default: :class:`SAMState`).
    gradient_factory: ``factory(params, extra_args) -> GradientFn``, for a
      method whose descent gradient is not ``∇ loss_fn``.
    ascent_gradient_factory: the factory of the groups' ``g_i`` under
      :class:`~sam_optax.Splits`.
    split_argnames: extra arguments of the method's own that hold one row
      per example and are split with the batch.
    phased: whether the method has a cheap phase (LookSAM): the rule then
      also gets ``ascent_step``, the extra argument of ``update`` (None, or
      the phase as a Python bool, see :func:`sam_optax._phase.chosen_phase`). Other methods
      reject ``ascent_step=False``.
    unsupported: ``{option: reason}`` for the data-parallel options the
      method cannot take, keyed as :func:`sam_optax._parallel.kind_of`
      spells them (``"MicroBatches"``, ``"Splits(sequential=True)"``, ...);
      such an option is refused at construction with the reason.

  Returns:
    The method's ``optax.GradientTransformationExtraArgs``.

  Example:
    A method is its rule; SAM's is two lines:

    >>> import jax.numpy as jnp
    >>> from sam_optax import _ascent, _numerics
    >>> def rule(grads, state, ascent, *, rho):
    ...   return ascent.gradient_at(ascent.normalized(grads), rho), state
    >>> loss_fn = lambda w: jnp.sum(jnp.cos(w))
    >>> tx = _ascent.transformation(
    ...     "my_sam", rule, radii={"rho": 0.05}, loss_fn=loss_fn, has_aux=False,
    ...     perturbation=None, mask=None, eps=_numerics.DEFAULT_EPS)
    >>> w = jnp.ones(3)
    >>> surrogate, state = tx.update(-jnp.sin(w), tx.init(w), w)
    >>> int(state.count)
    1
  """
  for name, value in radii.items():
    _checks.check_radius(name, value, method)
  _checks.check_callable("loss_fn", loss_fn, method)
  _checks.check_positive("eps", eps, method)
  _parallel.check_perturbation(method, perturbation)
  kind = _parallel.kind_of(perturbation)
  if unsupported and kind in unsupported:
    raise ValueError(f"{method}: perturbation={perturbation!r} is not supported: {unsupported[kind]}")
  if mask is not None and not callable(mask):
    resolve_mask(method, mask, mask)  # structure and leaf types, at once

  if gradient_factory is None:
    gradient_factory = lambda params, args: _loss.make_gradient_fn(method, loss_fn, has_aux, args)
  if ascent_gradient_factory is None:
    ascent_gradient_factory = gradient_factory
  if init is None:
    init = lambda params: SAMState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, **extra_args):
    _checks.check_not_wrapped(method)
    _checks.check_update_inputs(method, updates, params)
    _checks.check_not_masked(method, updates, params)
    values = {name: _numerics.radius_at(value, state.count) for name, value in radii.items()}
    if phased:
      values[_phase.ASCENT_STEP] = extra_args.pop(_phase.ASCENT_STEP, None)
    else:
      _phase.reject_phase(method, extra_args)
    resolved_mask = resolve_mask(method, mask, params)

    def run(grads, gradient_fn, mean):
      ascent = Ascent(params, gradient_fn, resolved_mask, eps, mean)
      surrogate, new_state = rule(grads, state, ascent, **values)
      return _numerics.cast_like(surrogate, updates), new_state

    surrogate, new_state = _parallel.run_rule(
        method, perturbation, run, updates, params, extra_args,
        gradient_factory=gradient_factory, ascent_gradient_factory=ascent_gradient_factory,
        split_argnames=split_argnames)
    new_state = keep_state_if_not_finite(surrogate, state, new_state)
    return surrogate, new_state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def keep_state_if_not_finite(surrogate: Any, state: Any, new_state: Any) -> Any:
  """``new_state`` if every leaf of ``surrogate`` is finite, else ``state``.

  The method's accumulators (LookSAM's ``g_v``, FriendlySAM's and VaSSO's
  EMAs, ...) never take in a step whose surrogate gradient holds a NaN or an
  inf (e.g. a NaN of the loss at the ascent point): that step's state is
  the previous one. Its ``count`` is advanced by the caller either way, as
  on a skipped step of :func:`sam_optax.every_k` (:func:`advance_counts`),
  so ρ schedules keep following the step number; the phase of the next step
  (``ascent_next``) is step bookkeeping too and always advances. A state of
  counts only is returned as it is.
  """
  def is_bookkeeping(path):
    return (bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and path[-1].name in ("count", "ascent_next"))

  kept = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(new_state)
          if not is_bookkeeping(path)]
  if not kept:
    return new_state
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(surrogate)]))
  return jax.tree_util.tree_map_with_path(
      lambda path, new, old: new if is_bookkeeping(path) else jnp.where(finite, new, old),
      new_state, state)
