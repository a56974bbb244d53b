"""Test setup: 8 simulated CPU devices (set before JAX starts), fp32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A persistent compilation cache, inherited by the CLI subprocesses the tests start: the kill-and-resume and
# export tests compile the same step several times, and compiling dominates the suite's time on 2 cores.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/mft_jax_test_compilation_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s; run with -m slow")
