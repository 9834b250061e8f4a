"""8 simulated CPU devices for every test (set before JAX starts), and the tiny shared test config."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from tiny import tiny_config  # noqa: E402,F401 (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


@pytest.fixture
def config():
  return tiny_config()


def pytest_configure(config):
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
