"""sam_optax: sharpness-aware minimization as composable Optax transformations.

Every method is an ``optax.GradientTransformationExtraArgs`` that wraps a loss
function and is chained before a base optimizer::

  tx = optax.chain(sam_optax.sam(rho=0.05, loss_fn=loss_fn), optax.sgd(lr, momentum=0.9))
  updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
"""

from sam_optax import losses
from sam_optax._ascent import SAMState
from sam_optax.asam import asam, not_a_bias
from sam_optax.bsam import bsam
from sam_optax.csam import csam
from sam_optax.esam import ESAMState, esam
from sam_optax.gsam import gsam
from sam_optax.interval import (IntervalState, StochasticState, every_k, interval_sam,
                                stochastic_sam, with_probability)
from sam_optax.looksam import LookSAMState, looksam
from sam_optax.mesa import MESAState, mesa, mesa_model_state, mesa_params, mesa_target
from sam_optax.saf import SAFState, saf, saf_check, saf_target
from sam_optax.sam import sam, usam
from sam_optax.schedules import rho_schedule_from_lr
from sam_optax.stable import stable_sam

__version__ = "0.1.0"

__all__ = [
    "ESAMState",
    "IntervalState",
    "LookSAMState",
    "MESAState",
    "SAFState",
    "SAMState",
    "StochasticState",
    "asam",
    "bsam",
    "csam",
    "esam",
    "every_k",
    "gsam",
    "interval_sam",
    "looksam",
    "losses",
    "mesa",
    "mesa_model_state",
    "mesa_params",
    "mesa_target",
    "not_a_bias",
    "rho_schedule_from_lr",
    "saf",
    "saf_check",
    "saf_target",
    "sam",
    "stable_sam",
    "stochastic_sam",
    "usam",
    "with_probability",
]
