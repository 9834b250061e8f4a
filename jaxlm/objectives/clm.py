"""Causal language modelling (GPT): predict every next token; with per-token loss weights, supervised
fine-tuning (a pairs store counts only the response tokens and their EOS)."""

import dataclasses

import numpy as np

from jaxlm.objectives.base import Objective, cross_entropy_sums, model_inputs, passthrough


def next_token(rows: dict) -> dict:
  """Rows of T + 1 tokens -> inputs (the first T) and targets (the last T): the one next-token shift.

  Segment ids, positions and weights describe the T targets and pass through.
  """
  tokens = np.asarray(rows["tokens"], np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], **passthrough(rows)}
  if "weights" in rows:
    batch["weights"] = np.asarray(rows["weights"], np.float32)
  return batch


def _shift(rows: dict, step: int, first_row: int) -> dict:
  return next_token(rows)


@dataclasses.dataclass(frozen=True)
class CausalLM(Objective):

  def model(self, model_config, rngs):
    from jaxlm.models.decoder import GPT

    return GPT(model_config, rngs=rngs)

  def transform(self, tokenizer, seed: int, stream: int, data=None):
    return _shift  # no randomness: the same for every stream and seed

  def loss_sums(self, model, batch, token_bytes_V, dropout_key):
    logits_BxTxV = model(batch["inputs"], dropout_key, **model_inputs(batch))
    return cross_entropy_sums(logits_BxTxV, batch["targets"], batch.get("weights"), token_bytes_V)


OBJECTIVE = CausalLM("clm", family="decoder", prompt_kind="continue")


def prompt_ids(tokenizer, text: str, packed: bool) -> np.ndarray:
  """A prompt's ids as the model saw text in training: a run on packed documents saw each one after
  an EOS (its beginning-of-text token), so its prompts start with one too (an SFT run's answers need it)."""
  ids = tokenizer.encode(text).astype(np.int32)
  return np.concatenate([np.array([tokenizer.EOS], np.int32), ids]) if packed else ids
