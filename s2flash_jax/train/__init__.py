"""Training: optimisers and training-loop pieces."""
