"""Benchmarks for sam_optax: what each method costs, against SGD and the alternatives.

Run ``python -m benchmarks.run`` from the repository root (``--help`` for the
settings). It measures, in one process so that the ratios are comparable:

* step time relative to plain SGD (median and interquartile range of many
  steps after compilation, each call followed by ``block_until_ready``);
* XLA flops of the compiled step (``compiled.cost_analysis()['flops']``);
* peak memory of the compiled step (``compiled.memory_analysis()``) minus
  SGD's, in parameter copies;

for every method of the library, a hand-written fused SAM step in plain JAX
and ``optax.contrib.sam`` (opaque and transparent modes), on a CIFAR-style
ResNet and on the MNIST-1D model, plus how the cost scales with the model's
width and with the number of (fake CPU) devices. It writes
``benchmarks/RESULTS.md`` and a PNG bar chart.

Modules:

* :mod:`benchmarks.tasks` -- a model, a batch and the loss (``Task``);
* :mod:`benchmarks.methods` -- the method table: name -> training step;
* :mod:`benchmarks.measure` -- compile, count flops and memory, time;
* :mod:`benchmarks.report` -- tables, ``RESULTS.md`` and the chart;
* :mod:`benchmarks.run` -- the command line.

``python -m benchmarks.scale`` (:mod:`benchmarks.scale`) is separate: it compiles
the trainer's step at the papers' sizes on fake devices, without running it,
and writes ``benchmarks/SCALE.md``.

This package is not part of the installed library (it needs flax, tqdm and
matplotlib); importing it does not import jax, so that ``benchmarks.run`` can
ask for fake CPU devices first.
"""
