"""Masked language modelling (BERT): a bidirectional encoder predicts the tokens hidden from it.

BERT's recipe: each non-special token is selected with probability 15%; a selected token becomes MASK
(80%), a random regular token (10%) or stays itself (10%); the loss counts the selected positions only.
The draws of row r of step s come from the seed, the stream (training, validation, `jaxlm eval`), s and
the row's place in the global batch, so they are the same on any mesh, any number of processes, and
after a resume. `jaxlm sample` fills every `<mask>` of a prompt (`fill_prompt`, `Filler`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.objectives.base import Objective, cross_entropy_sums, model_inputs, passthrough

SELECT, AS_MASK, AS_RANDOM = 0.15, 0.8, 0.1  # selected share; of those: MASK, random token (rest: kept)
MASK_TEXT = "<mask>"  # in a prompt, stands for the tokenizer's MASK token
_MASK_STREAM = 0x6d6c6d  # separates these draws from every other use of the seed


def special_ids(tokenizer) -> np.ndarray:
  return np.array([tokenizer.BOS, tokenizer.EOS, tokenizer.PAD, tokenizer.MASK], np.int32)


def regular_ids(tokenizer) -> np.ndarray:
  """The tokenizer's ids that are text (not BOS, EOS, PAD or MASK)."""
  return np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), special_ids(tokenizer))


class Masker:
  """rows (T + 1 tokens; the first is context for the causal shift and unused here) -> an MLM batch:
  inputs (masked), targets (the original tokens) and weights (1 on the selected positions)."""

  def __init__(self, tokenizer, seed: int, stream: int):
    if tokenizer.MASK in (tokenizer.BOS, tokenizer.EOS, tokenizer.PAD):
      raise UserError("the tokenizer has no mask token of its own (its EOS stands in for it)",
                      "masked LM needs one: prepare the data with a tokenizer that has \"<mask>\" or \"<|mask|>\", "
                      "or with --tokenizer=bpe:VOCAB")
    self.seed, self.stream, self.mask = seed, stream, tokenizer.MASK
    self.specials, self.regular = special_ids(tokenizer), regular_ids(tokenizer)

  def __call__(self, rows: dict, step: int, first_row: int) -> dict:
    targets = np.asarray(rows["tokens"], np.int32)[:, 1:]
    selectable = ~np.isin(targets, self.specials)
    if "weights" in rows:  # (padding, or positions the data does not count)
      selectable &= np.asarray(rows["weights"]) > 0
    b, t = targets.shape
    choice, pick = np.empty((b, 2, t)), np.empty((b, t), np.int64)
    for i in range(b):
      rng = np.random.default_rng([self.seed, _MASK_STREAM, self.stream, step, first_row + i])
      choice[i] = rng.random((2, t))
      pick[i] = rng.integers(0, len(self.regular), t)
    selected = selectable & (choice[:, 0] < SELECT)
    as_mask = selected & (choice[:, 1] < AS_MASK)
    as_random = selected & ~as_mask & (choice[:, 1] < AS_MASK + AS_RANDOM)
    inputs = np.where(as_mask, self.mask, np.where(as_random, self.regular[pick], targets)).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "weights": selected.astype(np.float32), **passthrough(rows)}


@dataclasses.dataclass(frozen=True)
class MaskedLM(Objective):

  def model(self, model_config, rngs):
    from jaxlm.models.encoder import Encoder

    return Encoder(model_config, rngs=rngs)

  def transform(self, tokenizer, seed: int, stream: int, data=None):
    return Masker(tokenizer, seed, stream)

  def loss_sums(self, model, batch, token_bytes_V, dropout_key):
    logits_BxTxV = model(batch["inputs"], dropout_key, **model_inputs(batch))
    return cross_entropy_sums(logits_BxTxV, batch["targets"], batch["weights"], token_bytes_V, accuracy=True)

  def check_data(self, pairs, source: str) -> None:
    if pairs is not None:
      raise UserError(f"{source} is a pairs store ({','.join(pairs)}), made for supervised "
                      "fine-tuning of a decoder; masked LM trains on plain documents",
                      "train it with --config.objective=clm, or prepare the text without --pairs for mlm")


OBJECTIVE = MaskedLM("mlm", family="encoder", prompt_kind="fill")


def fill_prompt(tokenizer, prompt: str) -> np.ndarray:
  """The ids of a prompt whose literal `<mask>`s stand for MASK tokens."""
  pieces = prompt.split(MASK_TEXT)
  if len(pieces) == 1:
    raise UserError(f"the prompt has no {MASK_TEXT}: a masked-LM run fills masks, it does not continue text",
                    f'write {MASK_TEXT} where tokens are missing, e.g. --prompt="The {MASK_TEXT} sat."')
  ids = []
  for i, piece in enumerate(pieces):
    if i:
      ids.append(np.array([tokenizer.MASK], np.int32))
    if piece:
      ids.append(tokenizer.encode(piece).astype(np.int32))
  return np.concatenate(ids)


@dataclasses.dataclass
class Filled:
  text: str  # the prompt with every <mask> filled by its most likely token
  candidates: list[list[tuple[str, float]]]  # per mask, the top-k (token text, probability)


class Filler:
  """Fills masks with an encoder's most likely regular tokens; one compiled program per padded length.

  `place` (parallel.Inference) runs it where the parameters live, the small batch replicated.
  """

  def __init__(self, graphdef, params, tokenizer, vocab_size: int, max_len: int, place):
    self.graphdef, self.params, self.tokenizer, self.max_len, self.place = graphdef, params, tokenizer, max_len, place
    self._allowed = np.zeros(vocab_size, bool)
    self._allowed[regular_ids(tokenizer)] = True  # only text tokens fill a mask
    self._programs = {}

  def __call__(self, prompt: str, top_k: int = 0) -> Filled:
    ids = fill_prompt(self.tokenizer, prompt)
    if len(ids) > self.max_len:
      raise UserError(f"the prompt is {len(ids)} tokens, but the model has {self.max_len} positions",
                      "shorten the prompt")
    length = min(-(-len(ids) // 16) * 16, self.max_len)
    tokens = np.full((1, length), self.tokenizer.PAD, np.int32)
    tokens[0, :len(ids)] = ids
    segments = (np.arange(length) < len(ids)).astype(np.int32)[None]  # padding: segment 0, unseen
    with self.place.context():
      probs_TxV = self.place.fetch(self._program(length)(self.params, self.place.put(tokens),
                                                         self.place.put(segments)))[0]
    if not np.all(np.isfinite(probs_TxV[:len(ids)])):
      raise UserError("the model's logits are not finite (NaN or inf): its parameters come from a run "
                      "that diverged", "fill with an earlier --step, or train again with a lower optim.lr")
    where = np.flatnonzero(ids == self.tokenizer.MASK)
    order_MxV = np.argsort(-probs_TxV[where], axis=-1, kind="stable")
    filled = ids.copy()
    filled[where] = order_MxV[:, 0]
    decode = lambda i: self.tokenizer.decode(np.array([i]))
    candidates = [[(decode(i), float(probs_TxV[w, i])) for i in order_MxV[n, :top_k]] for n, w in enumerate(where)]
    return Filled(self.tokenizer.decode(filled), candidates)

  def _program(self, length: int):
    if length not in self._programs:
      from flax import nnx

      from jaxlm.parallel import constrain

      graphdef, allowed_V = self.graphdef, jnp.asarray(self._allowed)

      def probabilities(params, tokens_1xT, segments_1xT):
        logits_1xTxV = nnx.merge(graphdef, params)(tokens_1xT, segment_ids_BxT=segments_1xT)
        probs_1xTxV = jax.nn.softmax(jnp.where(allowed_V, logits_1xTxV, -jnp.inf), axis=-1)
        return constrain(probs_1xTxV, (None, None, None))  # replicated: the host reads all of it

      self._programs[length] = jax.jit(probabilities)
    return self._programs[length]


def demo_prompt(tokenizer, tokens: np.ndarray, seed: int, length: int) -> str:
  """A prompt to show what a run learned: the first `length` tokens of `tokens` (e.g. validation) with
  about 15% of their regular tokens (at least one) written as <mask>."""
  ids = np.asarray(tokens[:length], np.int32)
  regular = np.flatnonzero(np.isin(ids, regular_ids(tokenizer)))
  if not len(regular):
    raise UserError("no text to mask at the start of the validation split", "set train.sample_tokens=0")
  rng = np.random.default_rng([seed, _MASK_STREAM])
  masked = set(rng.choice(regular, max(1, int(len(regular) * SELECT)), replace=False).tolist())
  pieces, run = [], []
  for i, token in enumerate(ids):
    if i in masked:
      pieces += [tokenizer.decode(np.array(run, np.int32)), MASK_TEXT]
      run = []
    else:
      run.append(int(token))
  return "".join(pieces) + tokenizer.decode(np.array(run, np.int32))
