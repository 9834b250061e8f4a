"""Objectives: one module per way of training, behind one seam, found by name (`config.objective`).

An objective owns everything between the rows the data paths cut (raw tokens, and segment ids,
positions and loss weights where the data has them) and the loss:

  transform(tokenizer, seed, stream, data) -> (rows, step, first_row) -> batch   host side, deterministic
  model(model_config, rngs)          -> the model family it trains (decoder, encoder, ...)
  loss_sums(model, batch, token_bytes, dropout_key) -> sums that add up over microbatches and batches
  check_data(pairs, source)          -> refuses data it cannot train on
  what `sample` does with a prompt   -> `prompt_kind` and the API (generate for clm, fill for mlm,
                                        translate for span and seq2seq)
  and, where an objective differs from the defaults: the raw row length it needs (`row_len`), ids it
  adds to the vocabulary (`extra_ids`), its own row packing (`example_packer`), config checks

train.py, evaluate.py, the loop, `jaxlm sample`/`eval` and the API take the objective from `get()`
only. A new objective is a new module here and one line in MODULES.
"""

import importlib

from jaxlm.errors import UserError

MODULES = {
    "clm": "jaxlm.objectives.clm",  # causal LM: next-token prediction (GPT), incl. SFT with loss masks
    "mlm": "jaxlm.objectives.mlm",  # masked LM: BERT's 15% masking, bidirectional encoder
    "span": "jaxlm.objectives.span",  # T5 span corruption: an encoder-decoder restores hidden spans
    "seq2seq": "jaxlm.objectives.seq2seq",  # supervised (input, target) pairs, an encoder-decoder
}
NAMES = tuple(MODULES)


def get(name: str):
  """The objective called `name` (an `objectives.base.Objective`)."""
  if name not in MODULES:
    raise UserError(f"objective {name!r} is not one of {', '.join(NAMES)}",
                    f"set --config.objective={NAMES[0]} (causal LM), mlm (masked LM), span (T5 "
                    "pre-training) or seq2seq (pairs)")
  return importlib.import_module(MODULES[name]).OBJECTIVE
