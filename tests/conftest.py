import os
from pathlib import Path

# Tests compile many small programs and run each briefly: LLVM's optimisation passes cost more
# time than they save here (~30% of compile time). Set before JAX starts its CPU backend.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

import jax  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Compiled XLA programs are reused across test runs on the same machine.
jax.config.update("jax_compilation_cache_dir", os.environ.get("S2FLASH_JAX_CACHE", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def fake_devices_env(count: int, **extra: str) -> dict[str, str]:
    """Environment for a subprocess with `count` fake CPU devices (fixed when JAX starts there)."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count} {FAST_COMPILE_FLAG}",
            "PYTHONPATH": str(REPO), **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
