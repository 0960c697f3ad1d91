"""Training: datasets, caches, the loop, adapters, checkpoints and resume, samples."""
