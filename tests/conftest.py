"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere; one compile cache per session."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after the flags above)

# Training runs and CLI commands build their jitted functions afresh on every call,
# so the same program is compiled again and again across tests. XLA's persistent
# cache, in a folder of this session only (empty at the start, removed at the end),
# hands back the executable already compiled for an identical program; tracing and
# lowering still happen, so compile logs and per-shape counts are unchanged.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="embedder-tests-xla-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
