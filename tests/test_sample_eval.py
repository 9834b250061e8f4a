"""`jaxlm sample`, `jaxlm eval` and the Python API on a trained workdir."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import nnx

import jaxlm
from jaxlm import cli
from jaxlm.data.prepare import prepare
from jaxlm.errors import UserError

TEXT = "The fox and the crow sat in the old oak tree, and the crow sang. " * 12


@pytest.fixture(scope="module")
def workdir(trained_run):
  """The shared finished run (conftest.py): sample_prompt "Once", 32 positions."""
  return str(trained_run.workdir)


@pytest.fixture(scope="module")
def run(workdir):
  return jaxlm.load(workdir)


def cli_run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_sample_streams_text_that_begins_with_the_prompt(workdir, run, capsys):
  code, out, err = cli_run(capsys, "sample", f"--workdir={workdir}", "--prompt=The fox", "--max_new_tokens=20",
                           "--seed=4", "--top_k=30")
  assert code == 0, err
  want = run.generate("The fox", max_new_tokens=20, seed=4, top_k=30)
  assert out == want + "\n" and want.startswith("The fox")
  pieces = []
  streamed = run.generate("The fox", max_new_tokens=20, seed=4, top_k=30, on_text=lambda i, t: pieces.append(t))
  assert streamed == want and "".join(pieces) == want[len("The fox"):] and len(pieces) >= 3


def test_several_samples_are_the_batched_samples(workdir, run, capsys):
  code, out, _ = cli_run(capsys, "sample", f"--workdir={workdir}", "--num_samples=3", "--max_new_tokens=12",
                         "--temperature=1.5")
  assert code == 0
  texts = run.generate("Once", max_new_tokens=12, temperature=1.5, num_samples=3)  # the run's sample_prompt
  assert len(set(texts)) > 1
  for i, text in enumerate(texts):
    assert f"--- sample {i + 1} of 3 ---\n{text}\n" in out


def test_greedy_sampling_is_the_models_argmax(run):
  text = run.generate("Once", max_new_tokens=5, temperature=0.0)
  model = nnx.merge(run.graphdef, run.params)
  ids = list(run.tokenizer.encode("Once"))
  for _ in range(5):
    logits = model(jnp.asarray([ids], jnp.int32))[0, -1, :run.tokenizer.vocab_size]
    ids.append(int(jnp.argmax(logits)))
    if ids[-1] == run.tokenizer.EOS:
      ids.pop()
      break
  assert text == run.tokenizer.decode(np.asarray(ids))


@pytest.mark.parametrize(("flags", "message"), [
    (["--top_p=0"], r"top_p must be in \(0, 1\]"),
    (["--top_p=1.01"], r"top_p must be in \(0, 1\]"),
    (["--temperature=-0.1"], "temperature must be 0 or more"),
    (["--max_new_tokens=-1"], "--max_new_tokens must be positive, got -1"),
    (["--prompt=" + "x" * 40], "the prompt is 40 tokens, but the model has 32 positions"),
    (["--num_samples=0"], "--num_samples must be at least 1"),
    (["--prompt="], "a prompt is empty"),
    (["--step=5"], "no checkpoint for step 5"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_sample_refuses_bad_flags_in_one_line(workdir, capsys, flags, message):
  code, out, err = cli_run(capsys, "sample", f"--workdir={workdir}", *flags)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("jaxlm: error: ") and out == ""
  assert __import__("re").search(message, lines[0]), lines[0]


def test_workdirs_without_a_run_are_refused(tmp_path, capsys):
  (tmp_path / "configured").mkdir()
  (tmp_path / "configured" / "config.json").write_text(json.dumps(tiny_config().to_dict(), default=list))
  for workdir, message in ((tmp_path / "none", "does not exist"), (tmp_path, "has no config.json"),
                           (tmp_path / "configured", "no checkpoints in")):
    for command in ("sample", "eval"):
      code, out, err = cli_run(capsys, command, f"--workdir={workdir}")
      assert code == 2 and out == "" and err.startswith("jaxlm: error: ") and message in err, err
  code, _, err = cli_run(capsys, "eval")
  assert code == 2 and "missing --workdir" in err


def reference_loss(run, tokens):
  """Mean next-token loss over consecutive windows, computed directly with the model."""
  model = nnx.merge(run.graphdef, run.params)
  t, total, count = run.config.data.seq_len, 0.0, 0
  for start in range(0, len(tokens) - 1, t):
    piece = jnp.asarray(tokens[start:start + t + 1], jnp.int32)
    logp = jax.nn.log_softmax(model(piece[None, :-1])[0], axis=-1)
    total -= float(jnp.take_along_axis(logp, piece[1:, None], axis=-1).sum())
    count += len(piece) - 1
  return total / count, count


def test_eval_counts_every_token_once_and_matches_the_model(workdir, run, tmp_path, capsys):
  (tmp_path / "text.txt").write_text(TEXT)
  code, out, err = cli_run(capsys, "eval", f"--workdir={workdir}", f"--data={tmp_path / 'text.txt'}", "--json")
  assert code == 0, err
  result = json.loads(out)
  tokens = run.tokenizer.encode(TEXT)
  loss, count = reference_loss(run, tokens)
  assert result["tokens"] == count == len(tokens) - 1
  assert result["loss"] == pytest.approx(loss, rel=1e-4)
  assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
  assert result["bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-4)  # bytes: 1 token, 1 byte
  code, out, _ = cli_run(capsys, "eval", f"--workdir={workdir}")
  # Named apart from training's val_loss (a fixed sample of windows) in the output itself:
  assert code == 0 and out.startswith("built-in fairy tales (validation) at step 6, every token (")
  assert "training's val_loss is an estimate of this from 2 batches of windows" in out


def test_eval_reads_a_store_with_the_runs_tokenizer_only(workdir, run, tmp_path):
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"{i}: " + TEXT[:90]}) for i in range(60)))
  prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "bytes"), val_fraction=0.2, progress=False)
  result = run.evaluate(str(tmp_path / "bytes"))
  from jaxlm.data.store import TokenStore

  val = TokenStore(str(tmp_path / "bytes")).read("validation")[0]
  assert result["tokens"] == len(val) - 1 and result["data"].endswith("(validation)")
  assert result["loss"] == pytest.approx(reference_loss(run, val.astype(np.int32))[0], rel=1e-4)
  prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "bpe"), tokenizer="bpe:300", val_fraction=0.2,
          progress=False)
  with pytest.raises(UserError, match="tokenized with another tokenizer"):
    run.evaluate(str(tmp_path / "bpe"))


def test_metrics_and_plot(run):
  rows = run.metrics()
  assert [m["step"] for m in rows if "loss" in m] == [1, 2, 3, 4, 5, 6]
  assert [m["step"] for m in rows if "val_loss" in m] == [3, 6]
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  ax = run.plot()
  assert [line.get_label() for line in ax.get_lines()] == ["training", "validation"]
  assert list(ax.get_lines()[1].get_xdata()) == [3, 6]


def test_load_config_and_a_workdir_step(workdir):
  config = jaxlm.load_config(os.path.join(ROOT, "configs", "default.py"))
  assert config.model.max_seq_len == 128
  with pytest.raises(UserError, match="does not exist"):
    jaxlm.load_config("nope.py")
  earlier = jaxlm.load(workdir, step=3)
  assert earlier.step == 3 and "step=3" in repr(earlier)


def test_sample_says_when_the_positions_ran_out(workdir, run, capsys):
  # Greedy, no length asked for: as many tokens as fit the 32 positions after the 4 of the prompt.
  code, out, err = cli_run(capsys, "sample", f"--workdir={workdir}", "--prompt=Once", "--temperature=0")
  assert code == 0 and out.startswith("Once") and len(run.tokenizer.encode(out[:-1])) == 32
  assert err == ("jaxlm: note: (the text stops here: the model's 32 positions, model.max_seq_len, are full; "
                 "ask for more with max_new_tokens and the context slides past them)\n")
  code, out, err = cli_run(capsys, "sample", f"--workdir={workdir}", "--prompt=Once", "--temperature=0",
                           "--max_new_tokens=28")
  assert code == 0 and err == ""  # a length that was asked for is no surprise
