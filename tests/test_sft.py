"""Supervised fine-tuning: a pairs store's loss weights reach the loss (response tokens only, packed or
not), and a decoder fine-tuned on a toy task answers held-out prompts."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import nnx

import jaxlm
from jaxlm import cli
from jaxlm.data.prepare import prepare
from jaxlm.data.text import load_data
from jaxlm.models.decoder import GPT
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives.base import TRAIN_STREAM
from jaxlm.objectives.clm import OBJECTIVE as CLM
from processes import spawn_jaxlm

LETTERS = "abcdefghij"


def reversal_words(seed: int, count: int) -> list[str]:
  rng = random.Random(seed)
  return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(count)]


def write_pairs(path, words) -> str:
  path.write_text("".join(json.dumps({"prompt": f"{w}=", "response": w[::-1]}) + "\n" for w in words))
  return str(path)


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory):
  """A pairs store of the toy task "reverse the word": prompt "abc=", response "cba"."""
  root = tmp_path_factory.mktemp("sft")
  words = sorted(set(reversal_words(0, 6000)))
  held_out = set(words[::10])  # never trained on
  jsonl = write_pairs(root / "pairs.jsonl", [w for w in words if w not in held_out])
  prepare([jsonl], str(root / "store"), pairs=("prompt", "response"), val_fraction=0.05, progress=False)
  return str(root / "store"), sorted(held_out)


@pytest.mark.parametrize("sequences", ["packed", "windows"])
def test_the_loss_is_the_mean_over_response_tokens(pairs_store, sequences):
  path, _ = pairs_store
  config = tiny_config()
  config.data.path, config.data.sequences = path, sequences
  corpus = load_data(config.data)
  assert corpus.pairs == ("prompt", "response")
  data = corpus.train_batches(seq_len=16, batch_size=8, seed=0, transform=CLM.transform(corpus.tokenizer, 0,
                                                                                         TRAIN_STREAM))
  batch = next(data)
  weights, targets = batch["weights"], batch["targets"]
  assert 0 < weights.sum() < weights.size
  if sequences == "packed":  # weight 1 exactly on the response and its EOS, 0 on "abc="
    eq = int(corpus.tokenizer.encode("=")[0])
    checked = 0
    for r in range(len(targets)):
      for s in np.unique(batch["segment_ids"][r]):
        where = np.flatnonzero(batch["segment_ids"][r] == s)
        piece, w = list(targets[r, where]), weights[r, where]
        if batch["positions"][r, where[0]] == 0 and eq in piece:  # (an example from its start)
          after = np.arange(len(piece)) > piece.index(eq)
          assert np.array_equal(w, after.astype(np.float32)), corpus.tokenizer.decode(np.array(piece))
          checked += 1
    assert checked >= 8
  model = GPT(ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=32),
              rngs=nnx.Rngs(params=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  sums = CLM.loss_sums(model, batch, jnp.ones(384), None)
  logits = model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"), positions_BxT=batch.get("positions"))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  by_hand = float(jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"]))
  assert float(sums["loss_sum"] / sums["tokens"]) == pytest.approx(by_hand, rel=1e-6)
  assert sums["tokens"] == weights.sum()


def test_changing_the_prompts_targets_does_not_change_the_gradient(pairs_store):
  path, _ = pairs_store
  config = tiny_config()
  config.data.path, config.data.sequences = path, "packed"
  corpus = load_data(config.data)
  batch = next(corpus.train_batches(seq_len=16, batch_size=8, seed=0, transform=CLM.transform(None, 0, 0)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  graphdef, params = nnx.split(GPT(ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=64,
                                               mlp_width=128, max_seq_len=32), rngs=nnx.Rngs(params=0)))

  def grads(b):
    def loss(p):
      sums = CLM.loss_sums(nnx.merge(graphdef, p), b, jnp.ones(384), None)
      return sums["loss_sum"] / sums["tokens"]
    return jax.grad(loss)(params)

  prompt = batch["weights"] == 0
  changed = {**batch, "targets": jnp.where(prompt, (batch["targets"] + 5) % 256, batch["targets"])}
  assert int(prompt.sum()) > 10
  for a, b in zip(jax.tree.leaves(grads(batch)), jax.tree.leaves(grads(changed))):
    np.testing.assert_array_equal(a, b)


STEPS = 500


@pytest.fixture(scope="module")
def fine_tuned(pairs_store, tmp_path_factory):
  """The tiny decoder trained on the reversal pairs by `jaxlm train` (packed, 2 CPU devices)."""
  path, held_out = pairs_store
  workdir = tmp_path_factory.mktemp("sft-run") / "w"
  (proc,) = spawn_jaxlm(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={workdir}",
                         f"--config.data.path={path}", "--config.data.sequences=packed", "--config.mesh.data=-1",
                         "--config.data.seq_len=32", "--config.data.batch_size=32", f"--config.train.steps={STEPS}",
                         "--config.train.eval_every=250", "--config.train.checkpoint_every=500",
                         "--config.train.log_every=50", "--config.optim.lr=3e-3", "--config.optim.warmup_steps=20",
                         "--config.train.sample_prompt=abcd=", "--config.train.sample_tokens=8"], devices=2)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return workdir, held_out, out


def test_a_fine_tuned_decoder_answers_held_out_prompts(fine_tuned, capsys):
  workdir, held_out, out = fine_tuned
  assert "(loss on the response tokens)" in out
  run = jaxlm.load(str(workdir))
  words = held_out[:100]
  answers = [run.generate(f"{w}=", temperature=0.0)[len(w) + 1:] for w in words]
  exact = np.mean([a == w[::-1] for a, w in zip(answers, words)])
  assert exact >= 0.9, list(zip(words, answers))[:20]
  # `jaxlm sample` answers and stops at EOS (and says nothing about positions running out).
  code = cli.main(["sample", f"--workdir={workdir}", "--prompt=jihgf=", "--temperature=0"])
  got, err = capsys.readouterr()
  assert code == 0 and got == "jihgf=fghij\n" and err == "", (got, err)


def test_eval_on_a_pairs_run_counts_the_responses(fine_tuned):
  workdir, _, _ = fine_tuned
  result = jaxlm.load(str(workdir)).evaluate()
  assert result["counted"] == "tokens of weight 1 (responses)" and result["loss"] < 0.5


def test_a_pairs_store_given_to_mlm_is_one_line(pairs_store, tmp_path, capsys):
  path, _ = pairs_store
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.mesh.data=-1",
                   "--config.objective=mlm", f"--config.data.path={path}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "is a pairs store (prompt,response), made for supervised" in err[0], err
  assert not (tmp_path / "w").exists()


def test_init_from_a_pretrained_decoder(trained_run, pairs_store, tmp_path):
  """SFT starts from a pre-trained run's parameters (a shape the tiny config shares)."""
  path, _ = pairs_store
  config = tiny_config()
  config.mesh.data, config.data.path, config.data.sequences = -1, path, "packed"
  config.init_from, config.train.steps = str(trained_run.workdir), 3
  config.train.eval_every = config.train.checkpoint_every = 3
  result = jaxlm.loop.run(config, str(tmp_path / "w"), quiet=True)
  assert np.isfinite(result["val_loss"])
