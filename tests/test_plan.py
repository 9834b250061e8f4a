"""`jaxlm plan`: its parameter count is the model's, its bytes per device are the memory analysis of the
very step the trainer compiles on the same mesh, an oversize job is one error line, bad flags too."""

import importlib.util
import json

import jax
import pytest

from conftest import tiny_config
from test_cli_errors import assert_one_line_error, run_cli

from jaxlm import aot, loop, plan
from jaxlm.errors import UserError
from jaxlm.metrics import param_count

TINY = "tests/tiny.py --config.mesh.data=-1"  # (tiny.py has mesh.data=1; these run on all devices)


def config_for(objective, shape, **model):
  c = tiny_config()
  c.objective = objective
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
  c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 1, 1, 1, 1
  c.train.eval_batches = 1
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


def trainers_step(config, workdir, monkeypatch):
  """(XLA's memory analysis of the train step `jaxlm train` compiles, with the state and batch it really
  gets, the parameter count of the state it trains): loop.compile_steps' train step, watched."""
  seen = {}
  compile_steps = loop.compile_steps

  def watched(*args):
    train, evaluate = compile_steps(*args)

    def first_call(state, batch):
      if not seen:
        seen["analysis"] = aot.memory_analysis(train.lower(state, batch).compile())
        seen["params"] = param_count(state.params)
        seen["state_bytes"] = (aot.bytes_per_device(state.params), aot.bytes_per_device(state.opt_state))
      return train(state, batch)
    return first_call, evaluate

  monkeypatch.setattr(loop, "compile_steps", watched)
  loop.run(config, str(workdir), quiet=True)
  return seen


# A decoder with grouped-query attention sharded three ways, an encoder-decoder over fsdp x tensor, an
# encoder over data and fsdp: the batch keys and the shardings differ for each.
CASES = {"clm": ("clm", (2, 2, 2), {"num_kv_heads": 2}), "span": ("span", (1, 4, 2), {"scan_layers": True}),
         "mlm": ("mlm", (4, 2, 1), {"remat": "full"})}


@pytest.mark.parametrize("case", list(CASES))
def test_bytes_per_device_are_the_trainers_compiled_step(case, tmp_path, monkeypatch):
  objective, shape, model = CASES[case]
  config = config_for(objective, shape, **model)
  seen = trainers_step(config, tmp_path / "w", monkeypatch)
  r = plan.plan(config)
  assert r["mesh"] == dict(zip(("data", "fsdp", "tensor"), shape)) and r["devices"] == 8
  assert r["memory_analysis"] == seen["analysis"]  # every figure, bitwise: the same program
  assert r["memory_analysis"]["temp"] > 0
  b = r["bytes_per_device"]
  assert (b["params"], b["optimizer"]) == seen["state_bytes"]
  assert b["total"] == plan.memory_total(seen["analysis"]) and b["temp"] == seen["analysis"]["temp"]
  assert r["params"] == seen["params"]
  assert r["params_formula"] == [r["params"], r["params_non_embedding"]]


def test_the_counts_and_the_arithmetic():
  config = config_for("clm", (8, 1, 1))
  r = plan.plan(config, mfu=0.5, memory_per_device_gib=1.0)
  c = config.model  # RMSNorm (a scale), RoPE (no position table), no biases, tied embeddings
  assert (c.norm, c.position, c.use_bias, c.tie_embeddings) == ("rmsnorm", "rope", False, True)
  blocks = c.num_layers * (4 * c.width * c.width + 2 * c.width * c.mlp_width + 2 * c.width)  # q k v o, MLP, 2 norms
  assert r["params_non_embedding"] == blocks + c.width  # and the final norm
  assert r["params"] == r["params_non_embedding"] + 384 * c.width
  assert r["tokens_per_step"] == 8 * 16 and r["train_tokens"] == 8 * 16 * config.train.steps
  assert r["train_flops_6nd"] == 6.0 * r["params"] * r["train_tokens"]
  assert r["chinchilla_tokens"] == 20 * r["params"]
  assert r["chinchilla_steps"] == -(-20 * r["params"] // 128)
  assert r["memory_per_device"] == 1 << 30 and r["fits"] is True
  step = r["flops_per_token"] * 128 / (8 * r["peak_flops_per_device"] * 0.5)
  assert r["step_seconds"] == pytest.approx(step) and r["total_seconds"] == pytest.approx(step * 1)


def test_the_cli_json_is_the_plan(capsys):
  from jaxlm import cli

  assert cli.main(["plan", *f"--config={TINY}".split(), "--json"]) == 0
  r = json.loads(capsys.readouterr().out)
  config = tiny_config()
  config.mesh.data = -1
  expected = plan.plan(config)
  # (the CPU peak is a matmul probe, measured anew by each plan: the time figures follow it)
  measured = ("peak_flops_per_device", "step_seconds", "total_seconds")
  assert {k: v for k, v in r.items() if k not in measured} == json.loads(json.dumps(
      {k: v for k, v in expected.items() if k not in measured}))
  assert r["step_seconds"] == pytest.approx(r["flops_per_token"] * 128 / (8 * r["peak_flops_per_device"] * 0.4))


def test_the_cli_text_names_each_figure(capsys):
  from jaxlm import cli

  assert cli.main(["plan", *f"--config={TINY}".split(), "--memory_per_device=2"]) == 0
  out = capsys.readouterr().out
  for line in ("parameters ", "model FLOPs ", "tokens per step  128", "Chinchilla ", "optimizer state ",
               "temporaries ", "available: 2.00 GiB (--memory_per_device): fits", "time at 40% MFU: "):
    assert line in out, (line, out)


def test_n_simulated_devices_compile_in_a_process_of_their_own(capsys):
  """--devices=2 plans for 2 CPU devices (this process has 8): the mesh and the shards follow."""
  from jaxlm import cli

  assert cli.main(["plan", *f"--config={TINY}".split(), "--devices=2", "--json"]) == 0
  two = json.loads(capsys.readouterr().out)
  eight = plan.plan(config_for("clm", (-1, 1, 1)))
  assert two["devices"] == 2 and two["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert two["params"] == eight["params"] and two["bytes_per_device"]["params"] == eight["bytes_per_device"]["params"]
  # 4 rows per device instead of 1: the activations grow
  assert two["bytes_per_device"]["temp"] > eight["bytes_per_device"]["temp"]


def test_an_oversize_job_is_one_line_with_what_to_change(capsys):
  code, err = run_cli(capsys, "plan", *f"--config={TINY}".split(), "--memory_per_device=0.001")
  assert_one_line_error(code, err, "the train step needs", "per device", "more than the 1.0 MiB available",
                        "--config.model.remat=full", "mesh.fsdp")


def test_a_job_that_fits_says_so_and_one_that_does_not_exits_2(capsys):
  from jaxlm import cli

  big = cli.main(["plan", *f"--config={TINY}".split(), "--config.model.width=512", "--config.model.mlp_width=2048",
                  "--config.model.num_heads=8", "--memory_per_device=0.01"])
  out = capsys.readouterr().out
  assert big == 2 and "DOES NOT FIT" in out


@pytest.mark.parametrize("args,fragment", [
    ((), "missing --config"),
    ((*f"--config={TINY}".split(), "--devices=x"), "--devices must be a positive integer"),
    ((*f"--config={TINY}".split(), "--devices=0"), "--devices must be a positive integer"),
    ((*f"--config={TINY}".split(), "--devices=2", "--topology=v5e:2x2"), "--devices and --topology both given"),
    ((*f"--config={TINY}".split(), "--mfu=0"), "--mfu must be in (0, 1]"),
    ((*f"--config={TINY}".split(), "--mfu=1.5"), "--mfu must be in (0, 1]"),
    ((*f"--config={TINY}".split(), "--memory_per_device=-1"), "--memory_per_device must be positive"),
    ((*f"--config={TINY}".split(), "--config.model.widht=3"), "unknown config key model.widht"),
    (("--config=nope.py",), "nope.py"),
    ((*f"--config={TINY}".split(), "--devices=3"), "not divisible"),  # (reported by the planning process)
    ((*f"--config={TINY}".split(), "--config.mesh.tensor=3"), "mesh"),
    ((*f"--config={TINY}".split(), "--config.data.path=missing.txt"), "missing.txt"),
    ((*f"--config={TINY}".split(), "--bogus=1"), "bogus"),
])
def test_bad_input_is_one_line(capsys, args, fragment):
  assert_one_line_error(*run_cli(capsys, "plan", *args), fragment)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_a_topology_without_libtpu_is_one_line(capsys):
  assert_one_line_error(*run_cli(capsys, "plan", *f"--config={TINY}".split(), "--topology=v5e:2x2"),
                        "--topology needs libtpu", "pip install")


class Lowered:
  """A lowered program whose compiler raises `error` (XLA's TPU compiler checks HBM as it compiles)."""

  def __init__(self, error):
    self.error = error

  def compile(self):
    raise self.error


def test_a_compiler_out_of_memory_is_one_line_quoting_xla():
  said = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (127.21G) "
          "exceeds available HBM (95.74G).\nmore detail")
  with pytest.raises(UserError) as e:
    aot.compile_or_explain(Lowered(jax.errors.JaxRuntimeError(said)), tiny_config(), 3 << 20)
  assert str(e.value).startswith("the train step does not fit its devices: XLA: Ran out of memory on HBM, the "
                                 "total memory required for HLO temporaries (127.21G) exceeds available HBM "
                                 "(95.74G) (the state alone: 3.0 MiB per device) (fewer rows per device")
  assert "--config.model.remat=full" in str(e.value) and "\n" not in str(e.value)


def test_any_other_compiler_error_keeps_its_traceback():
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: a bug"):
    aot.compile_or_explain(Lowered(jax.errors.JaxRuntimeError("INTERNAL: a bug")), tiny_config(), 0)


LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")
def test_a_tpu_topology_compiles_on_this_host(capsys):
  from jaxlm import cli

  assert cli.main(["plan", *f"--config={TINY}".split(), "--topology=v5e:2x2", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert (r["devices"], r["platform"], r["device_kind"], r["mesh"]["data"]) == (4, "tpu", "TPU v5 lite", 4)
  assert r["fits"] is True and r["peak_flops_per_device"] == 197e12


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")
def test_a_tpu_topology_too_small_is_xlas_one_line(capsys):
  code, err = run_cli(capsys, "plan", "--config=configs/gpt2_124m.py", "--topology=v5e:2x2")
  assert_one_line_error(code, err, "the train step does not fit its devices: XLA: Ran out of memory")


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")
def test_an_unknown_topology_is_one_line(capsys):
  assert_one_line_error(*run_cli(capsys, "plan", *f"--config={TINY}".split(), "--topology=v99:1x1"),
                        "--topology=v99:1x1")
