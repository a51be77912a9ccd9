"""Radius schedules that follow the learning-rate schedule."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from sam_optax import _checks


def rho_schedule_from_lr(
    lr_schedule: optax.Schedule,
    *,
    rho_max: float,
    rho_min: float = 0.0,
    lr_max: float,
    lr_min: float = 0.0,
) -> optax.Schedule:
  r"""ρ_t linear in the learning rate, as in GSAM and BSAM.

  .. math::

    ρ_t = ρ_{min} + (ρ_{max} − ρ_{min}) \frac{lr_t − lr_{min}}{lr_{max} − lr_{min}}.

  GSAM (Zhuang et al., 2022) uses it for its radius; BSAM's
  ``ρ_min,t = 0.05 · lr_t / lr_max`` is ``rho_max=0.05, rho_min=0, lr_min=0``.

  Args:
    lr_schedule: the optimizer's learning-rate schedule.
    rho_max: ρ when ``lr_t = lr_max``.
    rho_min: ρ when ``lr_t = lr_min``.
    lr_max: the schedule's largest learning rate (its peak).
    lr_min: the schedule's smallest learning rate.

  Returns:
    An optax schedule of the step count.

  Example:
    >>> import optax, sam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=100)
    >>> rho = sam_optax.rho_schedule_from_lr(lr, rho_max=0.05, lr_max=0.1)
    >>> round(float(rho(0)), 4), round(float(rho(100)), 4)
    (0.05, 0.0)
  """
  method = "rho_schedule_from_lr"
  _checks.check_callable("lr_schedule", lr_schedule, method, required=True)
  _checks.check_radius("rho_max", rho_max, method)
  _checks.check_radius("rho_min", rho_min, method)
  if not lr_max > lr_min:
    raise ValueError(f"{method}: need lr_max > lr_min, got lr_max={lr_max!r}, lr_min={lr_min!r}.")

  def schedule(count):
    fraction = (jnp.asarray(lr_schedule(count), jnp.float32) - lr_min) / (lr_max - lr_min)
    return rho_min + (rho_max - rho_min) * fraction

  return schedule
