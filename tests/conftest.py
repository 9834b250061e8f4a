"""8 simulated CPU devices for every test (set before JAX starts), and the tiny shared test config."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import base_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


def tiny_config():
  """A model small enough to compile in about a second; shapes divide every test mesh of 8 devices."""
  c = base_config()
  c.data.batch_size = 8
  c.data.seq_len = 16
  c.data.fairytale_bytes = 100_000
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.width = 64
  c.model.mlp_width = 128
  c.model.max_seq_len = 32
  c.optim.warmup_steps = 2
  c.train.steps = 6
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.train.sample_tokens = 0
  c.mesh.data = 1
  return c


@pytest.fixture
def config():
  return tiny_config()


def pytest_configure(config):
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
