"""The one error of the experiments: a bad command line, config or output folder.

Raised by every check of :mod:`experiments` (:mod:`experiments.config_checks`,
:mod:`experiments.placement`, :mod:`experiments.checkpoints`, ...); the
command lines (:mod:`experiments.main`, :mod:`experiments.compare`) print it
as one line and exit with status 2.
"""


class UsageError(Exception):
  """A bad command line, config or output folder: reported without a traceback."""
