"""Training objectives as pure functions of parameters, keys and batches."""
