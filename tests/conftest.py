"""Test configuration: 8 simulated CPU devices, so multi-device tests run anywhere."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite is compile-bound (hundreds of small programs run a few steps each): XLA:CPU's
# backend optimisation passes cost more than they save here. Results stay within every
# test's tolerance; set XLA_FLAGS yourself to test the optimised pipeline.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_backend(name: str) -> bool:
    try:
        return len(jax.devices(name)) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, backend in (("gpu", "gpu"), ("tpu", "tpu")):
            if marker in item.keywords and not _has_backend(backend):
                item.add_marker(pytest.mark.skip(reason=f"needs a {backend.upper()} backend"))


@pytest.fixture(scope="session")
def eight_devices():
    devs = jax.devices()
    if len(devs) < 8:
        pytest.skip("needs 8 (simulated) devices")
    return devs[:8]
