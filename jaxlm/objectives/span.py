"""T5's span-corruption pre-training: an encoder-decoder restores the spans hidden from its input.

A row of raw text (data/spans.py has the recipe) loses about `data.noise_density` of its tokens in spans
of mean length `data.mean_noise_span_length`, starting with non-noise; each span becomes one sentinel in
the input, and the target is each sentinel followed by its span, then EOS. The raw length is chosen so
that the inputs fill `data.seq_len` exactly; the targets' length follows (`data.target_len`, computed
when 0). Sentinels are ids above the tokenizer's (`<extra_id_0>` is the highest, then counting down, as
in T5); the model's vocabulary grows by as many as a row can need, then pads to a multiple of 128.

As T5 does (it concatenates documents before corrupting), a row is a stretch of the token stream: windows
or packed documents alike, with the EOS between documents as text. Draws are deterministic in (seed,
stream, step, row), as the masked LM's are.
"""

import dataclasses
import re

import numpy as np

from jaxlm.data import spans
from jaxlm.errors import UserError
from jaxlm.objectives.seq2seq import EncoderDecoderObjective, shift_right

SENTINEL = re.compile(r"<extra_id_(\d+)>")  # a sentinel in text form (prompts, decoded targets)


def recipe(data) -> spans.Recipe:
  """The span recipe of this data config: raw length, noise, spans, input and target lengths."""
  try:
    return spans.recipe(data.seq_len, data.noise_density, data.mean_noise_span_length)
  except ValueError as e:
    raise UserError(f"span corruption cannot fill data.seq_len={data.seq_len}: {e}",
                    "raise --config.data.seq_len") from None


def sentinel_ids(vocab_size: int, count: int) -> np.ndarray:
  """Sentinel j's id, for j = 0..count-1: from the top of the grown vocabulary down."""
  return np.arange(vocab_size + count - 1, vocab_size - 1, -1, dtype=np.int32)


class Corruptor:
  """Rows (raw_len + 1 tokens; the first is context and unused) -> a span-corruption batch: inputs
  (seq_len), targets (target_len, padded with weight 0 where data.target_len asks for more), the
  decoder's inputs (BOS, then the targets shifted right) and weights."""

  def __init__(self, tokenizer, data, seed: int, stream: int):
    self.recipe, self.target_len = recipe(data), data.target_len
    sentinels = sentinel_ids(tokenizer.vocab_size, self.recipe.num_spans)
    self.corrupt = spans.SpanCorruptor(self.recipe, sentinels, tokenizer.EOS, seed, stream)
    self.start, self.pad = tokenizer.BOS, tokenizer.PAD

  def __call__(self, rows: dict, step: int, first_row: int) -> dict:
    out = self.corrupt(np.asarray(rows["tokens"], np.int32)[:, 1:], step, first_row)
    targets = out["targets"]
    b, t = targets.shape
    weights = np.ones((b, max(t, self.target_len)), np.float32)
    if "weights" in rows:  # (evaluation's last rows: a partial row of the stream, or padding, counts nothing)
      weights *= np.all(np.asarray(rows["weights"]) > 0, axis=1, keepdims=True)
    if self.target_len > t:
      targets = np.concatenate([targets, np.full((b, self.target_len - t), self.pad, np.int32)], axis=1)
      weights[:, t:] = 0.0
    return {"inputs": out["inputs"], "targets": targets, "decoder_inputs": shift_right(targets, self.start),
            "weights": weights}


@dataclasses.dataclass(frozen=True)
class SpanCorruption(EncoderDecoderObjective):

  def transform(self, tokenizer, seed: int, stream: int, data=None):
    return Corruptor(tokenizer, data, seed, stream)

  def row_len(self, data) -> int:
    return recipe(data).raw_len

  def extra_ids(self, data) -> int:
    return recipe(data).num_spans

  def decoder_len(self, data) -> int:
    return data.target_len or recipe(data).targets_len

  def check_config(self, config) -> None:
    r, asked = recipe(config.data), config.data.target_len
    if asked and asked < r.targets_len:
      raise UserError(f"data.target_len={asked} is too small for span corruption of data.seq_len="
                      f"{config.data.seq_len}: its targets are {r.targets_len} tokens",
                      f"set --config.data.target_len={r.targets_len} (the smallest that works) or 0 (computed)")
    used = [int(j) for j in SENTINEL.findall(config.train.sample_prompt)]
    if config.train.sample_tokens and used and max(used) >= r.num_spans:
      raise UserError(f"train.sample_prompt has <extra_id_{max(used)}>, but this run's sentinels are "
                      f"<extra_id_0> to <extra_id_{r.num_spans - 1}>", "number the prompt's spans from <extra_id_0>")
    super().check_config(config)

  def check_data(self, pairs, source: str) -> None:
    if pairs is not None:
      raise UserError(f"{source} is a pairs store ({','.join(pairs)}); span corruption "
                      "pre-trains on plain text", "train pairs with --config.objective=seq2seq, or prepare "
                      "the text without --pairs for span")

  def summary(self, data) -> str:
    r = recipe(data)
    return (f"span corruption of {r.raw_len} raw tokens into {r.inputs_len} input and "
            f"{self.decoder_len(data)} target tokens (data.target_len), {r.num_spans} sentinels")


OBJECTIVE = SpanCorruption("span", family="encoder-decoder", prompt_kind="translate")


def encode_prompt(tokenizer, text: str, sentinels: int) -> np.ndarray:
  """A prompt's ids, its `<extra_id_N>`s as sentinel ids (a run has `sentinels` of them)."""
  ids, at = [], 0
  for match in SENTINEL.finditer(text):
    j = int(match.group(1))
    if j >= sentinels:
      raise UserError(f"the prompt has {match.group(0)}, but this run's sentinels are <extra_id_0> to "
                      f"<extra_id_{sentinels - 1}>", "number the spans from <extra_id_0>")
    ids += [tokenizer.encode(text[at:match.start()]), sentinel_ids(tokenizer.vocab_size, sentinels)[j:j + 1]]
    at = match.end()
  ids.append(tokenizer.encode(text[at:]))
  return np.concatenate([np.asarray(i, np.int32) for i in ids])


def decode_text(tokenizer, ids, sentinels: int) -> str:
  """Decoded text with each sentinel written `<extra_id_N>`."""
  ids, top = np.asarray(ids, np.int32), tokenizer.vocab_size + sentinels - 1
  is_sentinel = (ids >= tokenizer.vocab_size) & (ids <= top)
  text, run = [], []
  for token, sentinel in zip(ids.tolist(), is_sentinel.tolist()):
    if sentinel:
      text += [tokenizer.decode(np.array(run, np.int32)), f"<extra_id_{top - token}>"]
      run = []
    else:
      run.append(token)
  return "".join(text) + tokenizer.decode(np.array(run, np.int32))
