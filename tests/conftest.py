"""8 simulated CPU devices for every test (set before JAX starts), the tiny test config, and the one
trained workdir the test modules share."""

import contextlib
import dataclasses
import io
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


@dataclasses.dataclass(frozen=True)
class Trained:
  config: object
  workdir: object  # pathlib.Path
  result: dict  # what loop.run returned
  output: str  # what it printed


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Trained:
  """A finished 6-step run of the tiny model on all 8 devices: checkpoints at steps 3 and 6,
  evaluations at 3 and 6, and an end-of-training sample of 40 tokens after "Once" (more than the 28
  that fit its 32 positions). Shared by several modules: read it, or copy it to change it."""
  from jaxlm import loop

  workdir = tmp_path_factory.mktemp("trained")
  config = tiny_config()
  config.mesh.data = -1
  config.train.sample_tokens, config.train.sample_prompt = 40, "Once"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = loop.run(config, str(workdir))
  return Trained(config, workdir, result, out.getvalue())


@dataclasses.dataclass(frozen=True)
class Bert:
  workdir: object  # pathlib.Path
  output: str  # what `jaxlm train` printed


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory) -> Bert:
  """configs/bert_tiny.py trained as a user runs it (`jaxlm train`, its own 2 CPU devices, its default
  budget): a masked-LM encoder that has learned something, shared by the MLM tests."""
  from processes import spawn_jaxlm

  workdir = tmp_path_factory.mktemp("bert") / "w"
  (proc,) = spawn_jaxlm(["train", f"--config={ROOT}/configs/bert_tiny.py", f"--workdir={workdir}"], devices=2)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return Bert(workdir, out)


def pytest_configure(config):
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
