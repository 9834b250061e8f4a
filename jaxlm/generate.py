"""Sampling text from a model: a prefill of the prompts, then KV-cache decoding in a compiled loop.

A batch of prompts of different lengths is right-padded to one shape. The prefill runs the model over
all of them at once, filling a static-shaped KV cache, and samples each row's first new token from
the logits at its own last prompt position. Decoding then feeds one token per row per step at the
row's own position (`lax.while_loop`, compiled once per shape): the cache is written there, and the
query attends to every cached position up to it, so padding is never seen and is overwritten as the
row grows. A row stops at EOS or after `max_new_tokens`; the loop stops when all rows have. Logits
that are not finite (parameters of a run that diverged) are an error, never a text of NUL bytes.

Past the model's positions the context slides, as nanoGPT crops it: when a row's window of
`max_seq_len` tokens is full, its newest `kept_after_slide(max_seq_len)` tokens (three quarters) are
prefilled again at positions 0.., inside the compiled loop, and decoding goes on from the cache; so a
token sees between 3/4 and all of the window, and it costs one prefill every max_seq_len // 4 + 1 new
tokens instead of one full forward per token. (Every cached key depends on the tokens before it, so a
window that moved by one token has nothing to reuse: re-prefilling is the exact way to move it.)

Sampling: temperature (0 is greedy), then top-k, then top-p (the smallest set of most likely tokens
whose probability reaches p). The random key of row r's j-th token is fold_in(fold_in(seed, sample
id r), j): the same seed gives the same text, in a batch or one prompt at a time, and however the
decoding is split into chunks for streaming.

With a mesh, the parameters keep their sharding (FSDP, tensor parallel); the batch is replicated.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import DEFAULT_RULES
from jaxlm.errors import UserError
from jaxlm.models.decoder import init_cache
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import Inference, constrain

NEG = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the logits."""

  temperature: float = 1.0  # 0: greedy (argmax)
  top_k: int = 0  # 0: no limit
  top_p: float = 1.0  # 1: no limit

  def check(self) -> "Sampling":
    if not self.temperature >= 0:
      raise UserError(f"temperature must be 0 or more, got {self.temperature}",
                      "use --temperature=0 for greedy decoding, 1 for the model's own distribution")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}", "e.g. --top_p=0.9; 1 turns it off")
    if self.top_k < 0:
      raise UserError(f"top_k must be 0 or more, got {self.top_k}", "e.g. --top_k=40; 0 turns it off")
    return self


def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Scaled logits with everything outside the top-k and the top-p nucleus set to a huge negative.

  temperature, top_k and top_p are traced scalars, so one compiled program serves every setting.
  """
  v = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  in_top_k_V = jnp.arange(v) < k
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, NEG), axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the more likely tokens
  # (The most likely token always stays; top_p = 1 keeps all, even where float sums reach 1 early.)
  keep_BxV = in_top_k_V & ((before_BxV < top_p) | (top_p >= 1.0))
  last_B = jnp.sum(keep_BxV, axis=-1) - 1
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, last_B[:, None], axis=-1)
  return jnp.where(scaled_BxV >= threshold_Bx1, scaled_BxV, NEG)


def choose(logits_BxV: jax.Array, keys_B: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """The next token of each row: greedy at temperature 0, else sampled from the filtered logits."""
  filtered_BxV = filter_logits(logits_BxV, temperature, top_k, top_p)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
  return jnp.where(temperature == 0, jnp.argmax(logits_BxV, axis=-1), sampled_B).astype(jnp.int32)


def limit_vocab(logits_BxTxV: jax.Array, limit: int | None) -> jax.Array:
  """Logits with ids at or above `limit` (the vocabulary's padding) never chosen."""
  if limit is None:
    return logits_BxTxV
  return jnp.where(jnp.arange(logits_BxTxV.shape[-1]) < limit, logits_BxTxV, NEG)


def positions_full(max_seq_len: int) -> str:
  """What to say when a text stopped because the model's positions ran out (not at EOS)."""
  return (f"(the text stops here: the model's {max_seq_len} positions, model.max_seq_len, are full; "
          "ask for more with max_new_tokens and the context slides past them)")


def kept_after_slide(max_seq_len: int) -> int:
  """How many of a full window's newest tokens stay when it slides (the oldest quarter goes)."""
  return max_seq_len - max(1, max_seq_len // 4)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Generator:
  """Generates from one set of parameters; compiled programs are kept per shape and reused.

  `vocab_limit`: ids at or above it (the padding of the model's vocabulary) are never produced.
  `mesh` and `rules`: where sharded parameters live and their logical-axis rules (config.mesh.rules).
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, model_config: ModelConfig, *,
               eos_id: int, vocab_limit: int | None = None, mesh=None, rules=DEFAULT_RULES):
    self.graphdef, self.params, self.cfg = graphdef, params, model_config
    self.eos_id, self.vocab_limit, self.mesh = eos_id, vocab_limit, mesh
    self.place = Inference(mesh, rules)
    self._compiled = {}

  def room(self, prompt_length: int) -> int:
    """How many new tokens fit after a prompt of this length in the model's positions (more slide)."""
    return self.cfg.max_seq_len - prompt_length

  def check(self, prompts: Sequence[np.ndarray], max_new_tokens: int) -> None:
    longest = max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
      raise UserError("a prompt is empty", "give at least one character of prompt (e.g. a newline)")
    if longest >= self.cfg.max_seq_len:
      raise UserError(f"the prompt is {longest} tokens, but the model has {self.cfg.max_seq_len} positions",
                      "shorten the prompt")
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be 1 or more, got {max_new_tokens}",
                      f"e.g. {self.room(longest)} fills the model's positions; more slide the context")

  def generate(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0, sample_ids: Sequence[int] | None = None,
               on_tokens: Callable[[list[np.ndarray]], None] | None = None, chunk: int = 0
               ) -> list[np.ndarray]:
    """Each prompt's new tokens (ending at, and without, EOS).

    `on_tokens(new)`: called with each row's tokens so far, after the prefill and after every `chunk`
    decoding steps (0: once, at the end), so a caller can stream text as it is decoded.
    `sample_ids` (default 0..B-1) pick each row's random stream.
    """
    sampling.check()
    self.check(prompts, max_new_tokens)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    total = round_up(int(lengths.max()) + max_new_tokens, 64)  # every row's prompt and new tokens
    width = min(total, self.cfg.max_seq_len)  # the KV cache's positions
    padded = min(round_up(int(lengths.max()), 16), width)
    tokens = np.zeros((b, padded), np.int32)
    for row, p in enumerate(prompts):
      tokens[row, :len(p)] = p
    ids = np.arange(b) if sample_ids is None else np.asarray(sample_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.asarray(ids, jnp.uint32))
    settings = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
    prefill, decode = self._programs(b, padded, width, total)
    with self.place.context():
      state = prefill(self.params, self.place.put(tokens), self.place.put(lengths), self.place.put(keys),
                      jnp.int32(max_new_tokens), *settings)
      while True:
        if bool(np.any(self.place.fetch(state["broken"]))):
          raise UserError("the model's logits are not finite (NaN or inf): its parameters come from a run "
                          "that diverged", "sample an earlier --step, or train again with a lower optim.lr")
        if on_tokens is not None:
          on_tokens(self._new_tokens(state, lengths))
        if int(state["n"]) >= max_new_tokens or bool(np.all(self.place.fetch(state["done"]))):
          break
        stop_at = max_new_tokens if chunk <= 0 else int(state["n"]) + chunk
        state = decode(self.params, state, jnp.int32(stop_at), jnp.int32(max_new_tokens), *settings)
    return self._new_tokens(state, lengths)

  def _new_tokens(self, state, lengths) -> list[np.ndarray]:
    out, last, done = (self.place.fetch(state[k]) for k in ("out", "pos", "done"))
    rows = []
    for row, start in enumerate(lengths):
      new = out[row, start:last[row] + 1]
      rows.append(new[:-1] if len(new) and done[row] and new[-1] == self.eos_id else new)
    return rows

  def _programs(self, b: int, padded: int, width: int, total: int):
    shape = (b, padded, width, total)
    if shape not in self._compiled:
      self._compiled[shape] = self._compile(*shape)
    return self._compiled[shape]

  def _compile(self, b: int, padded: int, width: int, total: int):
    graphdef, cfg, eos = self.graphdef, self.cfg, self.eos_id
    limit = self.vocab_limit

    def logits_for(model, tokens_BxT, positions_BxT, cache):
      logits_BxTxV, cache = model(tokens_BxT, positions_BxT=positions_BxT, kv_cache=cache)
      return limit_vocab(logits_BxTxV, limit), cache

    rows = jnp.arange(b)

    def prefill(params, tokens_BxP, lengths_B, keys_B, max_new, temperature, top_k, top_p):
      model = nnx.merge(graphdef, params)
      positions_BxP = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (b, padded))
      logits_BxPxV, cache = logits_for(model, tokens_BxP, positions_BxP, init_cache(cfg, b, width))
      last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, 0)
      first_B = choose(last_BxV, step_keys, temperature, top_k, top_p)
      broken_B = ~jnp.all(jnp.isfinite(last_BxV), axis=-1)
      out_BxN = jnp.zeros((b, total), jnp.int32).at[:, :padded].set(tokens_BxP)
      out_BxN = out_BxN.at[jnp.arange(b), lengths_B].set(first_B)
      done_B = (first_B == eos) | (max_new <= 1)
      return _replicated({"out": out_BxN, "pos": lengths_B, "done": done_B, "n": jnp.int32(1),
                          "keys": keys_B, "cache": cache, "broken": broken_B,
                          "base": jnp.zeros((b,), jnp.int32)})

    next_logits = _window_step(logits_for, b, total, cfg.max_seq_len)

    def decode(params, state, stop_at, max_new, temperature, top_k, top_p):
      model = nnx.merge(graphdef, params)

      def running(s):
        return (s["n"] < stop_at) & (s["n"] < max_new) & ~jnp.all(s["done"])

      def step(s):
        logits_BxV, cache, base_B = next_logits(model, s)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(s["keys"], s["n"])
        new_B = choose(logits_BxV, step_keys, temperature, top_k, top_p)
        pos_B = jnp.where(s["done"], s["pos"], s["pos"] + 1)
        out = jnp.where(s["done"][:, None], s["out"], s["out"].at[rows, pos_B].set(new_B))
        done_B = s["done"] | (new_B == eos) | (s["n"] + 1 >= max_new)
        broken_B = s["broken"] | (~s["done"] & ~jnp.all(jnp.isfinite(logits_BxV), axis=-1))
        return {**s, "out": out, "pos": pos_B, "done": done_B, "n": s["n"] + 1, "cache": cache,
                "broken": broken_B, "base": base_B}

      return _replicated(jax.lax.while_loop(running, step, state))

    return jax.jit(prefill), jax.jit(decode, donate_argnums=1)


def _window_step(logits_for, b: int, total: int, max_seq_len: int):
  """The decoding step's model call for a batch of b rows in a buffer of `total` tokens:
  next_logits(model, state) -> (logits (B, V), cache, window starts)."""
  rows, keep = jnp.arange(b), kept_after_slide(max_seq_len)

  def next_logits(model, s):
    """Each row's logits after its token at out[pos] (B, V), the cache and window starts after it:
    one cached step, or, for rows whose window is full, a prefill of their newest `keep` tokens."""
    token_B = s["out"][rows, s["pos"]]
    at_B = s["pos"] - s["base"]  # the token's position in its row's window
    slide_B = (at_B >= max_seq_len) & ~s["done"]

    def step(_):
      logits_Bx1xV, cache = logits_for(model, token_B[:, None], at_B[:, None], s["cache"])
      return logits_Bx1xV[:, 0], cache

    def slide(_):
      starts_B = s["pos"] - keep + 1
      window_BxK = jax.vmap(lambda o, at: jax.lax.dynamic_slice(o, (at,), (keep,)))(s["out"], starts_B)
      positions_BxK = jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (b, keep))
      slid_BxKxV, slid_cache = logits_for(model, window_BxK, positions_BxK, s["cache"])
      stepped_BxV, stepped_cache = step(None)
      pick = lambda a, c: jnp.where(slide_B.reshape((b,) + (1,) * (a.ndim - 1)), a, c)
      return pick(slid_BxKxV[:, -1], stepped_BxV), jax.tree.map(pick, slid_cache, stepped_cache)

    if total <= max_seq_len:  # (no row can fill its window: the program has no slide in it)
      return (*step(None), s["base"])
    logits_BxV, cache = jax.lax.cond(jnp.any(slide_B), slide, step, None)
    return logits_BxV, cache, jnp.where(slide_B, s["pos"] - keep + 1, s["base"])

  return next_logits


def _replicated(state: dict) -> dict:
  """Pins what the host reads (tokens, positions, flags) to every device; the cache stays as it is."""
  pin = ("out", "pos", "done", "n", "broken")
  return {k: constrain(v, (None,) * v.ndim) if k in pin else v for k, v in state.items()}
