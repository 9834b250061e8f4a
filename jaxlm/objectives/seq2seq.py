"""Sequence-to-sequence (T5 fine-tuning): an encoder-decoder learns to write each example's target from
its input, from a pairs store (`jaxlm prepare --pairs=input,target`).

An example is a document of the store: the input's tokens (loss weight 0) then the target's and EOS
(weight 1). The encoder reads the input and an EOS; the decoder reads BOS (its start token) and the
target shifted right, and predicts the target. Examples are packed on both sides as t5x does
(data/pairs.py): encoder rows of data.seq_len and decoder rows of data.target_len positions, each example
its own segment on both sides, so it attends only to itself; longer examples are truncated and counted.

What every encoder-decoder objective shares (the model, the shift, the loss) is here; span.py is the
pre-training objective.
"""

import dataclasses

import numpy as np

from jaxlm.errors import UserError
from jaxlm.objectives.base import Objective, cross_entropy_sums

ENCDEC_INPUTS = ("input_segment_ids", "input_positions", "target_segment_ids", "target_positions")


def shift_right(targets_BxT: np.ndarray, start: int, positions_BxT: np.ndarray | None = None) -> np.ndarray:
  """The decoder's inputs: `start`, then each target but the last; with positions (packed examples),
  `start` again where each example's target begins."""
  shifted = np.concatenate([np.full((len(targets_BxT), 1), start, np.int32), targets_BxT[:, :-1]], axis=1)
  return shifted if positions_BxT is None else np.where(positions_BxT == 0, start, shifted).astype(np.int32)


def target_len(data) -> int:
  """Decoder positions per row of a seq2seq run."""
  return data.target_len or data.seq_len


class Shift:
  """Packed example rows -> the batch: decoder inputs (the targets shifted right per example) and loss
  weights (every target position of an example, no padding)."""

  def __init__(self, start: int):
    self.start = start

  def __call__(self, rows: dict, step: int, first_row: int) -> dict:
    batch = {k: np.asarray(v, np.int32) for k, v in rows.items()}
    batch["decoder_inputs"] = shift_right(batch["targets"], self.start, batch["target_positions"])
    batch["weights"] = (batch["target_segment_ids"] != 0).astype(np.float32)
    return batch


@dataclasses.dataclass(frozen=True)
class EncoderDecoderObjective(Objective):
  """The model and loss of every encoder-decoder objective: cross-entropy of the targets."""

  def model(self, model_config, rngs):
    from jaxlm.models.encdec import EncoderDecoder

    return EncoderDecoder(model_config, rngs=rngs)

  def loss_sums(self, model, batch, token_bytes_V, dropout_key):
    extra = {k: batch[k] for k in ENCDEC_INPUTS if k in batch}
    logits_BxTxV = model(batch["inputs"], batch["decoder_inputs"], dropout_key, **extra)
    return cross_entropy_sums(logits_BxTxV, batch["targets"], batch.get("weights"), token_bytes_V, accuracy=True)

  def check_config(self, config) -> None:
    m, length = config.model, self.decoder_len(config.data)
    if m.position != "rope":
      raise UserError(f"objective {config.objective} (an encoder-decoder) uses rotary positions, not "
                      f"model.position={m.position}", "set --config.model.position=rope")
    if length > m.max_seq_len:
      raise UserError(f"the decoder's {length} positions (data.target_len) are more than model.max_seq_len "
                      f"{m.max_seq_len}", "raise model.max_seq_len or lower data.target_len")

  def decoder_len(self, data) -> int:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Seq2Seq(EncoderDecoderObjective):

  def transform(self, tokenizer, seed: int, stream: int, data=None):
    return Shift(tokenizer.BOS)

  def decoder_len(self, data) -> int:
    return target_len(data)

  def check_data(self, pairs, source: str) -> None:
    if pairs is None:
      raise UserError(f"{source} is plain text; objective seq2seq trains on (input, target) pairs",
                      "prepare them: jaxlm prepare --input=pairs.jsonl --pairs=input,target --output=DIR, and "
                      "give --config.data.path=DIR (or pre-train on text with --config.objective=span)")

  packs_examples = True

  def example_packer(self, offsets, weights, data, seed: int, stream: int, shuffle: bool = True):
    from jaxlm.data.pairs import PairPacker, example_lengths

    inputs, targets = example_lengths(offsets, weights)
    return PairPacker(offsets, inputs, targets, data.seq_len, target_len(data), seed, pad=0, stream=stream,
                      shuffle=shuffle)  # (padding: segment 0, weight 0; nothing sees it)

  def summary(self, data) -> str:
    return f"pairs packed into {data.seq_len} input and {target_len(data)} target positions"


OBJECTIVE = Seq2Seq("seq2seq", family="encoder-decoder", prompt_kind="translate")
