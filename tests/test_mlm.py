"""Masked LM: BERT's masking statistics, a loss on the selected positions only, a bidirectional encoder
that respects documents and padding, a tiny BERT that learns, and `sample`/`eval`/the API on it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

import jaxlm
from jaxlm import cli
from jaxlm.data.packing import Packer
from jaxlm.data.text import load_data
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.models.encoder import Encoder
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives import mlm
from jaxlm.objectives.base import TRAIN_STREAM
from jaxlm.objectives.mlm import OBJECTIVE as MLM

TOK = ByteTokenizer()
SPECIALS = [TOK.BOS, TOK.EOS, TOK.PAD, TOK.MASK]
CFG = ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=64)


def random_rows(b, t, seed=0):
  """Rows of T + 1 byte tokens with about 5% special tokens among them."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (b, t + 1)).astype(np.int32)
  special = rng.random((b, t + 1)) < 0.05
  tokens[special] = rng.choice(SPECIALS, special.sum())
  return {"tokens": tokens}


def test_masking_selects_15_percent_of_text_tokens_split_80_10_10():
  rows = random_rows(64, 2048)  # 131k positions
  batch = mlm.Masker(TOK, seed=3, stream=TRAIN_STREAM)(rows, step=7, first_row=0)
  targets, inputs, selected = batch["targets"], batch["inputs"], batch["weights"] > 0
  assert np.array_equal(targets, rows["tokens"][:, 1:])
  text = ~np.isin(targets, SPECIALS)
  assert text.sum() > 100_000
  assert not selected[~text].any(), "BOS, EOS, PAD and MASK are never selected"
  assert np.array_equal(inputs[~selected], targets[~selected]), "only selected positions change"
  share = selected.sum() / text.sum()
  assert abs(share - 0.15) < 0.005, share
  n = selected.sum()
  as_mask = (inputs[selected] == TOK.MASK).sum() / n
  as_random = ((inputs[selected] != TOK.MASK) & (inputs[selected] != targets[selected])).sum() / n
  kept = (inputs[selected] == targets[selected]).sum() / n
  # (a random token equals the original 1 time in 256: that share of the 10% counts as kept)
  assert abs(as_mask - 0.8) < 0.015 and abs(as_random - 0.1) < 0.015 and abs(kept - 0.1) < 0.015
  assert not np.isin(inputs[selected & (inputs != TOK.MASK)], SPECIALS).any(), "random tokens are text"


def test_masks_are_a_function_of_seed_step_and_row_on_any_split_of_the_batch():
  rows = random_rows(8, 64)
  masker = mlm.Masker(TOK, seed=1, stream=TRAIN_STREAM)
  whole = masker(rows, step=5, first_row=0)
  again = mlm.Masker(TOK, seed=1, stream=TRAIN_STREAM)(rows, step=5, first_row=0)
  halves = [masker({"tokens": rows["tokens"][i * 4:(i + 1) * 4]}, step=5, first_row=i * 4) for i in (0, 1)]
  for key in whole:
    assert np.array_equal(whole[key], again[key])
    assert np.array_equal(whole[key], np.concatenate([h[key] for h in halves])), "two processes' halves"
  for other in (masker(rows, step=6, first_row=0), mlm.Masker(TOK, 2, TRAIN_STREAM)(rows, 5, 0),
                mlm.Masker(TOK, 1, TRAIN_STREAM + 1)(rows, 5, 0)):
    assert not np.array_equal(other["weights"], whole["weights"]), "another step, seed or stream: other masks"


def test_weight_zero_positions_are_never_selected():
  rows = random_rows(16, 256)
  rows["weights"] = (np.arange(256) < 100).astype(np.float32)[None].repeat(16, 0)  # e.g. padding after 100
  batch = mlm.Masker(TOK, 0, TRAIN_STREAM)(rows, 0, 0)
  assert batch["weights"][:, :100].sum() > 100 and batch["weights"][:, 100:].sum() == 0


def loss_and_grads(model, batch):
  graphdef, params = nnx.split(model)

  def mean_loss(p):
    sums = MLM.loss_sums(nnx.merge(graphdef, p), batch, jnp.ones(384), None)
    return sums["loss_sum"] / sums["tokens"]
  return jax.value_and_grad(mean_loss)(params)


def test_the_loss_counts_only_the_selected_positions():
  model = Encoder(CFG, rngs=nnx.Rngs(params=0))
  batch = {k: jnp.asarray(v) for k, v in mlm.Masker(TOK, 0, TRAIN_STREAM)(random_rows(4, 32), 0, 0).items()}
  loss, grads = loss_and_grads(model, batch)
  elsewhere = batch["weights"] == 0
  changed = {**batch, "targets": jnp.where(elsewhere, (batch["targets"] + 17) % 256, batch["targets"])}
  assert int(elsewhere.sum()) > 64 and not np.array_equal(changed["targets"], batch["targets"])
  loss2, grads2 = loss_and_grads(model, changed)
  assert loss2 == loss
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(a, b)
  selected = np.flatnonzero(np.asarray(batch["weights"]).reshape(-1))[0]
  moved = batch["targets"].reshape(-1).at[selected].add(1).reshape(batch["targets"].shape)
  assert loss_and_grads(model, {**batch, "targets": moved})[0] != loss, "a selected target does count"


def test_the_encoder_sees_both_sides():
  model = Encoder(CFG, rngs=nnx.Rngs(params=0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 24)), jnp.int32)
  changed = tokens.at[0, 12].set((tokens[0, 12] + 1) % 256)
  a, b = model(tokens), model(changed)
  assert not np.allclose(a[0, :12], b[0, :12], atol=1e-4), "positions before t see the token at t"
  assert not np.allclose(a[0, 13:], b[0, 13:], atol=1e-4)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_a_packed_document_gets_the_outputs_it_gets_alone_and_padding_changes_nothing(position):
  cfg = ModelConfig(**{**CFG.__dict__, "position": position})
  model = Encoder(cfg, rngs=nnx.Rngs(params=0))
  lengths = [5, 30, 11, 2, 20]
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(0, 256, n - 1), TOK.EOS).astype(np.int32) for n in lengths]
  packer = Packer(np.concatenate([[0], np.cumsum(lengths)]), 16, seed=0, eos=TOK.EOS)
  rows = packer.rows_from_array(range(packer.rows_per_epoch), np.concatenate(docs))
  tokens, segments = rows["tokens"][:, 1:], rows["segment_ids"]
  packed = model(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(segments),
                 positions_BxT=jnp.asarray(rows["positions"]))
  checked = 0
  for r in range(len(tokens)):
    for s in np.unique(segments[r]):
      where = segments[r] == s
      alone = model(jnp.asarray(tokens[r, where])[None])[0]
      np.testing.assert_allclose(packed[r, where], alone, rtol=2e-5, atol=2e-5)
      checked += 1
  assert checked > len(tokens)
  # Padding (segment 0) after a row's text: the text's outputs are those of the text alone.
  text = jnp.asarray(docs[1][None])
  padded = jnp.concatenate([text, jnp.full((1, 10), TOK.PAD, jnp.int32)], axis=1)
  ids = jnp.asarray((np.arange(40) < 30).astype(np.int32)[None])
  np.testing.assert_allclose(model(padded, segment_ids_BxT=ids)[0, :30], model(text)[0], rtol=2e-5, atol=2e-5)


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def most_frequent_token_accuracy(run):
  """Accuracy of always predicting the most frequent text token, on the run's validation split."""
  val = load_data(run.config.data).val_tokens
  text = val[np.isin(val, mlm.regular_ids(run.tokenizer))]
  return np.bincount(text).max() / len(text)


def test_bert_tiny_learns_and_reports_its_metrics(bert_run):
  lines = metrics(bert_run.workdir)
  train = [m for m in lines if "loss" in m]
  evals = [m for m in lines if "val_loss" in m]
  assert all({"loss", "accuracy", "lr", "grad_norm", "tokens_per_sec"} <= m.keys() for m in train)
  assert all({"val_loss", "val_ppl", "val_accuracy"} <= m.keys() for m in evals)
  run = jaxlm.load(str(bert_run.workdir))
  baseline = most_frequent_token_accuracy(run)
  assert 0.1 < baseline < 0.3  # (a space, in English text)
  assert evals[-1]["val_accuracy"] >= 2 * baseline, (evals[-1], baseline)
  assert "objective mlm: encoder of" in bert_run.output and "\n-> " in bert_run.output  # the end sample


def test_eval_reports_masked_token_metrics_and_does_not_recompile(bert_run, tmp_path, capsys):
  run = jaxlm.load(str(bert_run.workdir))
  text = run.tokenizer.decode(load_data(run.config.data).val_tokens[:30_000])  # (a part: quicker)
  (tmp_path / "val.txt").write_text(text)
  first = run.evaluate(str(tmp_path / "val.txt"))
  compiled = run._evaluator.eval_step._cache_size()
  again = run.evaluate(str(tmp_path / "val.txt"))
  assert again == first and run._evaluator.eval_step._cache_size() == compiled == 1
  tokens = len(run.tokenizer.encode(text))
  assert abs(first["tokens"] / (tokens - 1) - 0.15) < 0.02  # about 15% of the text's tokens, each once
  assert first["accuracy"] > 2 * most_frequent_token_accuracy(run)
  assert first["perplexity"] == pytest.approx(np.exp(first["loss"]))
  code = cli.main(["eval", f"--workdir={bert_run.workdir}", f"--data={tmp_path / 'val.txt'}", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert code == 0 and out["accuracy"] == pytest.approx(first["accuracy"]) and out["counted"] == "masked tokens"


def test_sample_fills_every_mask_and_shows_the_top_k(bert_run, capsys):
  prompt = "Once upon a <mask><mask><mask><mask>, there lived a king."
  code = cli.main(["sample", f"--workdir={bert_run.workdir}", f"--prompt={prompt}", "--top_k=3"])
  out, err = capsys.readouterr()
  assert code == 0, err
  lines = out.splitlines()
  run = jaxlm.load(str(bert_run.workdir))
  filled = run.fill(prompt, top_k=3)
  assert lines[0] == filled.text and len(filled.text) == len(prompt) - 4 * len("<mask>") + 4
  assert filled.text.startswith("Once upon a ") and filled.text.endswith(", there lived a king.")
  assert len(lines) == 5 and all(line.startswith(f"  <mask> {i}: ") for i, line in enumerate(lines[1:], 1))
  for candidates in filled.candidates:
    probs = [p for _, p in candidates]
    assert len(candidates) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  # The fill is the encoder's argmax over text tokens at each mask.
  ids = mlm.fill_prompt(run.tokenizer, prompt)
  logits = nnx.merge(run.graphdef, run.params)(jnp.asarray(ids[None]))[0]
  logits = jnp.where(jnp.isin(jnp.arange(logits.shape[-1]), jnp.asarray(mlm.regular_ids(run.tokenizer))),
                     logits, -jnp.inf)
  want = np.where(ids == run.tokenizer.MASK, np.asarray(jnp.argmax(logits, -1)), ids)
  assert filled.text == run.tokenizer.decode(want)


@pytest.mark.parametrize(("flags", "message"), [
    (["--prompt=Once upon a time"], "the prompt has no <mask>: a masked-LM run fills masks"),
    (["--prompt=The <mask>", "--temperature=0.5"], "--temperature does not apply to"),
    (["--prompt=The <mask>", "--num_samples=2", "--max_new_tokens=4"],
     "--num_samples, --max_new_tokens do not apply to"),
    (["--prompt=The <mask>", "--top_k=-1"], "top_k must be 0 or more"),
    (["--prompt=" + "<mask>" * 200], "the prompt is 200 tokens, but the model has 128 positions"),
])
def test_bad_fill_requests_are_one_line(bert_run, capsys, flags, message):
  code = cli.main(["sample", f"--workdir={bert_run.workdir}", *flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_mask_prompt_to_a_decoder_run_is_one_line(trained_run, capsys):
  code = cli.main(["sample", f"--workdir={trained_run.workdir}", "--prompt=The <mask> sat."])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "the prompt has <mask>, but" in err[0] and "is a decoder" in err[0]
  with pytest.raises(jaxlm.errors.UserError, match="is a decoder run .objective clm.; it cannot fill"):
    jaxlm.load(str(trained_run.workdir)).fill("The <mask>")


def test_generate_on_an_encoder_run_is_refused(bert_run):
  with pytest.raises(jaxlm.errors.UserError, match="is an encoder run .objective mlm.; it cannot generate"):
    jaxlm.load(str(bert_run.workdir)).generate("Once")


def test_init_from_a_run_of_another_family_names_both(trained_run, tmp_path, capsys):
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.mesh.data=-1",
                   "--config.objective=mlm", f"--config.init_from={trained_run.workdir}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert "is a decoder (objective clm); objective mlm trains an encoder" in err[0]
  assert not (tmp_path / "w").exists()


def test_an_unknown_objective_is_one_line(tmp_path, capsys):
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.objective=gpt"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "objective is 'gpt', not one of clm, mlm" in err[0], err


def test_resuming_with_another_objective_is_one_line(trained_run, tmp_path, capsys):
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={trained_run.workdir}",
                   "--config.mesh.data=-1", "--config.objective=mlm"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "was trained with objective='clm'; this run asks for 'mlm'" in err[0], err
