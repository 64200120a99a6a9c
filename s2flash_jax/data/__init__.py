"""Training data: precomputed latent + caption-embedding records, grain pipelines over ArrayRecord/TFDS."""
