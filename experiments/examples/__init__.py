"""Runnable examples: SAM with Flax linen (TrainState) and with Flax NNX (nnx.Optimizer)."""
