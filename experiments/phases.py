"""How a method with a cheap phase (LookSAM, interval and stochastic SAM) picks it.

``config.phase``: ``'static'`` traces the training step once per phase and
calls the one the optimizer state names (:class:`PhasedStep`); ``'cond'``
keeps the method's ``jax.lax.cond``; ``'auto'`` chooses (:func:`phase_form`).
"""

from __future__ import annotations

import functools

import jax

import sam_optax
from experiments.errors import UsageError

PHASES = ("auto", "static", "cond")
MODELS_WITHOUT_CONVOLUTIONS = frozenset({"mlp"})


class PhasedStep:
  """Two compiled training steps, one per phase, called as the state says.

  For the methods with a cheap phase (LookSAM, interval and stochastic SAM):
  ``train_step`` traced with ``ascent_step=True`` and with ``False``, neither
  holding a ``jax.lax.cond``; each call reads the phase of the next step from
  the optimizer state (:func:`sam_optax.takes_ascent_step`, a host read of
  one bool) and runs that step. On XLA:CPU a convolution gradient inside a
  conditional runs several times slower (``benchmarks/RESULTS.md``), so this
  is the trainer's form on CPU (``config.phase``).
  """

  def __init__(self, train_step, jit_step):
    self.steps = {phase: jit_step(functools.partial(train_step, ascent_step=phase))
                  for phase in (True, False)}

  def __call__(self, state, batch, rng):
    return self.steps[sam_optax.takes_ascent_step(state.opt_state)](state, batch, rng)


def phase_form(config, opt_state) -> str | None:
  """``'static'`` or ``'cond'`` for a method with a cheap phase, else None.

  ``config.phase``: ``'auto'`` is static on the CPU backend for a model with
  convolutions (XLA:CPU runs a convolution gradient inside a conditional
  several times slower: ResNet-18, interval SAM k = 5, 2.8× SGD's step time
  with ``lax.cond``, 1.1× static) and ``lax.cond`` otherwise (the MLP's steps
  take under a millisecond, less than the host read of the phase that the
  static form adds: 1.2× with ``lax.cond``, 2.3× static;
  ``benchmarks/RESULTS.md``); ``'static'`` / ``'cond'`` force one.
  """
  if sam_optax.takes_ascent_step(opt_state) is None:
    if config.phase == "static":
      raise UsageError(f"phase='static' applies to the methods with a cheap phase (looksam,"
                       f" interval_sam, stochastic_sam); {config.method} takes one form.")
    return None
  if config.phase == "auto":
    convolutional = config.model not in MODELS_WITHOUT_CONVOLUTIONS
    return "static" if jax.default_backend() == "cpu" and convolutional else "cond"
  return config.phase
