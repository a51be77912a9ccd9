"""The command line of one run: flags only; the work is ``train.train_and_evaluate``.

  python -m experiments.main --config=experiments/configs/default.py --workdir=runs/sam \\
      --config.method=sam --config.hparams.sam.rho=0.2
  python -m experiments.main --config=experiments/configs/default.py:tiny --workdir=/tmp/t
  python -m experiments.main ... --workdir=runs/sam --resume     # continue it

Every field of the config file is a flag ``--config.<field>=<value>``
(``ml_collections.config_flags``); the config is locked, so a mistyped field
is an error naming the nearest field. Bad flags, configs and folders print
one line ``error: ...`` on stderr and exit with status 2, before anything is
written. Several processes (multi-host): every process runs the same command
with its own ``--process_id`` (or ``--distributed`` on a TPU pod slice,
SLURM, Open MPI); see ``experiments/README.md``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import time
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from experiments import distributed, input_pipeline, placement, train
from experiments.config_checks import validate_config
from experiments.errors import UsageError

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

USAGE = """usage: python -m experiments.main --config=FILE[:tiny] --workdir=DIR
       [--config.FIELD=VALUE ...] [--resume] [--noprogress] [--coordinator_address=HOST:PORT --num_processes=N
       --process_id=I | --distributed]
"""


def define_flags(argv: Sequence[str] | None = None) -> flags.FlagValues:
  """The flags of one run (and of :mod:`experiments.compare`), in a fresh set.

  ``argv``: the command line the ``--config.<field>`` flags are read from
  (default ``sys.argv``).
  """
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Config file with get_config(arg); FILE:tiny for its tiny"
      " form. Every field is a flag --config.<field>=<value>.", flag_values=values,
      lock_config=True, sys_argv=None if argv is None else list(argv))
  flags.DEFINE_string("workdir", None, "The run's folder: results.json and checkpoints/"
                      " (default: runs/<method>-<dataset>-<date>-<time>).", flag_values=values)
  flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir"
                    " (refused if the config differs from the checkpoint's).",
                    flag_values=values)
  flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none).",
                    flag_values=values)
  flags.DEFINE_string("coordinator_address", None, "Several processes: process 0's HOST:PORT"
                      f" (default: ${distributed.ENV_COORDINATOR}).", flag_values=values)
  flags.DEFINE_integer("num_processes", None, "Several processes: how many"
                       f" (default: ${distributed.ENV_NUM_PROCESSES}).", flag_values=values)
  flags.DEFINE_integer("process_id", None, "Several processes: this one's id, 0 ... N-1"
                       f" (default: ${distributed.ENV_PROCESS_ID}).", flag_values=values)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let JAX"
                    " detect the cluster (TPU pod slices, SLURM, Open MPI).",
                    flag_values=values)
  return values


ERRORS = (UsageError, ValueError, ImportError, input_pipeline.DataNotFoundError)


def load_config(spec: str):
  """``get_config(arg)`` of ``FILE[:arg]``, as config_flags loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))


def _unknown_field(argv: Sequence[str]) -> str | None:
  """``--config.<path>: no such field; did you mean <nearest>?`` for the first bad path."""
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  try:
    config = load_config(specs[-1] if specs else DEFAULT_CONFIG)
  except Exception:  # pylint: disable=broad-except  (reported by the caller)
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        prefix = ".".join(parts[:depth] + [""])
        near = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, "keys")
                                         else [], n=1)
        hint = f"; did you mean {prefix}{near[0]}?" if near else "."
        return f"--config.{path}: the config has no field {prefix}{part}{hint}"
      node = node[part]
  return None


def parse(argv: Sequence[str]):
  """``(config, flags)`` that the command line ``argv`` (program name first) asks for.

  ``--help`` prints the flags and exits with status 0.

  Raises:
    UsageError: one line naming the bad flag, field or value.
  """
  values = define_flags(argv)
  if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
    print(USAGE + "\n" + values.get_help())
    sys.exit(0)
  try:
    rest = values(list(argv))
  except (flags.Error, AttributeError, KeyError) as error:
    text = str(error).strip()
    if "Traceback" in text:  # the config file raised: its last line says why
      text = text.splitlines()[-1]
    raise UsageError(_unknown_field(argv[1:]) or " ".join(text.split())) from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {rest[1:]}; every setting is a flag.")
  try:
    config = values.config
    config.to_dict()
  except Exception as error:  # pylint: disable=broad-except  (a config file that fails)
    raise UsageError(" ".join(f"--config: {error}".split())) from None
  return config, values


def run(config, options: flags.FlagValues) -> train.Result:
  """Starts ``jax.distributed`` if asked (before any device is touched), then trains."""
  spec = distributed.process_spec(options.coordinator_address, options.num_processes,
                                  options.process_id, auto=options.distributed)
  validate_config(config)
  placement.check_processes(config, spec.num_processes if spec is not None else None)
  distributed.initialize(spec)
  workdir = options.workdir
  if workdir is None:  # one time stamp for every process: process 0's
    stamp = time.localtime(distributed.broadcast_from_main(int(time.time())))
    workdir = os.path.join(
        "runs", f"{config.method}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S', stamp)}")
  return train.train_and_evaluate(config, workdir, resume=options.resume,
                                  progress=options.progress, validated=True)


def main(argv: Sequence[str] | None = None) -> int:
  """One run; known errors are one line on stderr and exit status 2."""
  argv = list(sys.argv if argv is None else argv)
  try:
    result = run(*parse(argv))
  except ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if not distributed.is_main_process():
    return 0
  if not result.finished:
    print(f"stopped at step {result.step}; checkpoint in {result.workdir}")
    return 0
  test = result.report["test"]
  print(f"{result.report['method']}: test accuracy {test['accuracy']:.4f}, NLL"
        f" {test['nll']:.4f}, ECE {test['ece']:.4f}, λ_max"
        f" {result.report['hessian_top_eigenvalue']}")
  print(f"results: {os.path.join(result.workdir, 'results.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
