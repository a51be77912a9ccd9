"""A persistent XLA compilation cache for a test module that compiles the same
programs again and again (training runs of the same model: seeds, resumes).

Import the fixture into the module (``from xla_cache import compilation_cache``);
it is autouse, module-scoped, and restores jax's settings afterwards.
"""

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical programs compile once per worker."""
  from jax._src import compilation_cache as cache  # pylint: disable=import-outside-toplevel

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  previous = {name: getattr(jax.config, name) for name in names}
  # One folder per worker, shared by the modules that use it (the training tests,
  # the comparison, the study compile some of the same programs).
  jax.config.update(names[0], str(tmp_path_factory.getbasetemp() / "xla-cache"))
  jax.config.update(names[1], 0.0)
  cache.reset_cache()
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  cache.reset_cache()
