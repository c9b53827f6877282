"""Training an adapter: data files to tokenized examples, the training loop with checkpoints,
evaluation (greedy generation for exact match), progress output, and pretraining a base from
scratch. May import: bases, methods, registry."""
