"""Training: typed configuration, the one training loop, distribution back-ends, checkpoints."""
