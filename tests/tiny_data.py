"""A tiny precomputed dataset matching configs/tiny.py (8x8x4 latents, 8-token 32-wide captions)."""

from pathlib import Path

from tests.data_helpers import write_dataset


def write_tiny_dataset(directory: Path, *, num_records: int = 48, prompts_only: bool = False) -> str:
    """Records as tests/data_helpers.make_record makes them (without latents if prompts_only);
    returns the directory as str."""
    return str(write_dataset(directory, num_records, records_per_shard=16,
                             latent_shape=None if prompts_only else (8, 8, 4), caption_dim=32))
