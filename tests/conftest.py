import os
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]

# Compiled XLA programs are reused across test runs on the same machine.
jax.config.update("jax_compilation_cache_dir", os.environ.get("S2FLASH_JAX_CACHE", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
