"""The one error conversion raises for bad input."""

from __future__ import annotations

from s2flash_jax.model_checkpoint import CheckpointError


class ConversionError(CheckpointError):
    """A source or target of a conversion that cannot be used: one line naming what is wrong and
    what was expected. A CheckpointError, so `s2flash` reports it as bad input (exit code 2)."""
