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


# Modules that take minutes (compiling and training on several fake devices, the quick demo): run
# first, so that the two CI workers (pyproject: --dist loadscope, one module per worker at a time)
# end together instead of one waiting on a long module at the end.
LONG_MODULES = ("test_train_sharded.py", "test_demo.py", "test_object_storage.py", "test_relative_paths.py",
                "test_health.py", "test_prepare_teacher.py", "test_distributed.py", "test_sd35_flash.py", "test_fork.py", "test_train.py", "test_mesh.py",
                "test_plan.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: file order otherwise


def fake_devices_env(count: int, **extra: str) -> dict[str, str]:
    """Environment for a subprocess with `count` fake CPU devices (fixed when JAX starts there)."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count} {FAST_COMPILE_FLAG}",
            "PYTHONPATH": str(REPO), **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
