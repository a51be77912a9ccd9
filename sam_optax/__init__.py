"""sam_optax: sharpness-aware minimization as composable Optax transformations.

Every method is an ``optax.GradientTransformationExtraArgs`` that wraps a loss
function and is chained before a base optimizer::

  tx = optax.chain(sam_optax.sam(rho=0.05, loss_fn=loss_fn), optax.sgd(lr, momentum=0.9))
  updates, opt_state = tx.update(grads, opt_state, params, batch=batch)

This file is the API: the implementations live in private modules, one per
method (``_sam.py``, ``_gsam.py``, ...) on the skeleton of ``_ascent.py``;
``losses``, ``schedules`` and ``sharpness`` (measuring it: the Hessian's
spectrum, m-sharpness, adaptive sharpness) are the public submodules.
"""

from sam_optax import losses, schedules, sharpness
from sam_optax._accumulation import accumulated_grad
from sam_optax._asam import asam, not_a_bias
from sam_optax._ascent import SAMState
from sam_optax._phase import takes_ascent_step
from sam_optax._bsam import bsam
from sam_optax._csam import csam
from sam_optax._esam import ESAMState, esam
from sam_optax._fsam import FSAMState, fsam
from sam_optax._gcsam import gcsam
from sam_optax._gsam import gsam
from sam_optax._interval import (IntervalState, StochasticState, every_k, interval_sam,
                                 stochastic_sam, with_probability)
from sam_optax._looksam import LookSAMState, looksam
from sam_optax._mesa import MESAState, mesa, mesa_model_state, mesa_params, mesa_target
from sam_optax._msam import MSAMState, msam, msam_eval_params
from sam_optax._parallel import MicroBatches, PerDevice, Perturbation, Splits, Synced, TwoGroups
from sam_optax._saf import SAFState, saf, saf_check, saf_target
from sam_optax._sam import sam, usam
from sam_optax._sampa import SAMPaState, sampa
from sam_optax._stable import stable_sam
from sam_optax._vasso import VaSSOState, vasso
from sam_optax._wsam import WSAMDecoupledState, wsam, wsam_decoupled
from sam_optax.schedules import rho_schedule_from_lr

__version__ = "0.1.0"

__all__ = [
    "ESAMState",
    "FSAMState",
    "IntervalState",
    "LookSAMState",
    "MESAState",
    "MSAMState",
    "MicroBatches",
    "PerDevice",
    "Perturbation",
    "SAFState",
    "SAMPaState",
    "SAMState",
    "Splits",
    "StochasticState",
    "Synced",
    "TwoGroups",
    "VaSSOState",
    "WSAMDecoupledState",
    "accumulated_grad",
    "asam",
    "bsam",
    "csam",
    "esam",
    "every_k",
    "fsam",
    "gcsam",
    "gsam",
    "interval_sam",
    "looksam",
    "losses",
    "mesa",
    "mesa_model_state",
    "mesa_params",
    "mesa_target",
    "msam",
    "msam_eval_params",
    "not_a_bias",
    "rho_schedule_from_lr",
    "saf",
    "saf_check",
    "saf_target",
    "sam",
    "sampa",
    "schedules",
    "sharpness",
    "stable_sam",
    "stochastic_sam",
    "takes_ascent_step",
    "usam",
    "vasso",
    "with_probability",
    "wsam",
    "wsam_decoupled",
]
