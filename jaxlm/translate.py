"""Decoding an encoder-decoder: the encoder runs once, then the decoder writes the target token by token.

Inputs of different lengths are right-padded to one shape (padding is segment 0: neither the encoder nor
cross-attention sees it). The encoder's output gives every decoder block's cross-attention keys and
values once; the decoder then feeds one token per step from its start token (BOS), with a KV cache for
its self-attention, in one compiled `lax.while_loop` per shape, as generate.py does for decoders:
greedy, temperature, top-k and top-p (generate.choose, the same random streams: row r's j-th token
draws from fold_in(fold_in(seed, r), j)), or beam search (beam.py; t5x's length penalty). A row stops at
EOS or after `max_new_tokens`. With a mesh, the parameters keep their sharding; the batch is replicated.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.beam import beam_search
from jaxlm.config import DEFAULT_RULES
from jaxlm.errors import UserError
from jaxlm.generate import Sampling, choose, limit_vocab, round_up
from jaxlm.models.decoder import init_cache
from jaxlm.models.encdec import cross_mask
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import Inference, constrain

DEFAULT_ALPHA = 0.6  # t5x's (and the T5 paper's) length penalty for beam search


class Translator:
  """Decodes targets for inputs with one set of parameters; compiled programs are kept per shape.

  `vocab_limit`: ids at or above it (the vocabulary's padding) are never produced. `start_id`: the
  decoder's first input (what training shifted in). `mesh`, `rules`: where sharded parameters live.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, model_config: ModelConfig, *, eos_id: int,
               start_id: int, vocab_limit: int | None = None, mesh=None, rules=DEFAULT_RULES):
    self.graphdef, self.params, self.cfg = graphdef, params, model_config
    self.eos_id, self.start_id, self.vocab_limit = eos_id, start_id, vocab_limit
    self.place = Inference(mesh, rules)
    self._compiled = {}

  def check(self, inputs: Sequence[np.ndarray], max_new_tokens: int, beams: int = 1) -> None:
    positions = self.cfg.max_seq_len
    if any(len(x) == 0 for x in inputs):
      raise UserError("a prompt is empty", "give the input to transform, e.g. --prompt=\"...\"")
    if (longest := max(len(x) for x in inputs)) > positions:
      raise UserError(f"the prompt is {longest} tokens, but the encoder has {positions} positions "
                      "(model.max_seq_len)", f"shorten the prompt to at most {positions} tokens")
    if not 1 <= max_new_tokens <= positions:
      raise UserError(f"max_new_tokens={max_new_tokens} does not fit the decoder's {positions} positions",
                      f"ask for 1 to {positions} new tokens")
    if beams < 1:
      raise UserError(f"beams must be at least 1, got {beams}", "e.g. --beams=4; 1 decodes without a beam")

  def translate(self, inputs: Sequence[np.ndarray], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                seed: int = 0, sample_ids: Sequence[int] | None = None, beams: int = 1,
                alpha: float = DEFAULT_ALPHA, search: bool | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(each input's target tokens, ending at and without EOS; each target's log-probability under the
    model, EOS included where it ended there). `beams` > 1 (or `search`): beam search (deterministic;
    sampling settings do not apply), else greedy at temperature 0 or sampling."""
    search = beams > 1 if search is None else search
    sampling.check()
    self.check(inputs, max_new_tokens, beams)
    b, limit = len(inputs), self.cfg.max_seq_len
    padded = min(round_up(max(len(x) for x in inputs), 16), limit)
    tokens, segments = np.zeros((b, padded), np.int32), np.zeros((b, padded), np.int32)
    for row, x in enumerate(inputs):
      tokens[row, :len(x)], segments[row, :len(x)] = x, 1
    # (Beam search compiles for its exact length; sampling for a multiple of 16, stopping at max_new_tokens.)
    width = max_new_tokens if search else min(round_up(max_new_tokens, 16), limit)
    program = self._program(b, padded, width, beams if search else 0)
    with self.place.context():
      if search:
        out = program(self.params, self.place.put(tokens), self.place.put(segments), jnp.float32(alpha))
      else:
        ids = np.arange(b) if sample_ids is None else np.asarray(sample_ids)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.asarray(ids, jnp.uint32))
        settings = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
        out = program(self.params, self.place.put(tokens), self.place.put(segments), self.place.put(keys),
                      jnp.int32(max_new_tokens), *settings)
      out = {k: self.place.fetch(v) for k, v in out.items()}
    if bool(np.any(out["broken"])):
      raise UserError("the model's logits are not finite (NaN or inf): its parameters come from a run "
                      "that diverged", "decode an earlier --step, or train again with a lower optim.lr")
    targets = [row[:n] for row, n in zip(out["tokens"], out["lengths"])]
    return [t[:-1] if len(t) and t[-1] == self.eos_id else t for t in targets], out["logprobs"]

  def _program(self, b: int, padded: int, width: int, beams: int):
    """The compiled decoding of this shape: beam search of `beams`, or sampling (beams 0)."""
    key = (b, padded, width, beams)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(self._beam(b, width, beams) if beams else self._sample(b, width))
    return self._compiled[key]

  def _step_logits(self, model, tokens_N, index, cache, cross_kv, cmask_Nx1x1xS):
    """One decoder step for every row: (log-probabilities over the allowed ids, updated cache, broken)."""
    positions_Nx1 = jnp.full((len(tokens_N), 1), index, jnp.int32)
    logits_Nx1xV, cache = model.decode(tokens_N[:, None], cross_kv, cmask_Nx1x1xS, positions_BxT=positions_Nx1,
                                       kv_cache=cache)
    logits_NxV = logits_Nx1xV[:, 0]
    broken_N = ~jnp.all(jnp.isfinite(logits_NxV), axis=-1)
    return limit_vocab(logits_NxV, self.vocab_limit), cache, broken_N

  def _encoded(self, model, tokens_BxS, segments_BxS):
    enc_BxSxD = model.encode(tokens_BxS, segments_BxS)
    return model.cross_keys_values(enc_BxSxD), cross_mask(None, segments_BxS, tokens_BxS.shape[1])

  def _sample(self, b: int, width: int):
    graphdef, cfg, eos, start = self.graphdef, self.cfg, self.eos_id, self.start_id

    def run(params, tokens_BxS, segments_BxS, keys_B, max_new, temperature, top_k, top_p):
      model = nnx.merge(graphdef, params)
      cross_kv, cmask = self._encoded(model, tokens_BxS, segments_BxS)

      def running(s):
        return (s["n"] < max_new) & ~jnp.all(s["done"])

      def step(s):
        logits_BxV, cache, broken_B = self._step_logits(model, s["token"], s["n"], s["cache"], cross_kv, cmask)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, s["n"])
        new_B = choose(logits_BxV, step_keys, temperature, top_k, top_p)
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), new_B[:, None], axis=-1)[:, 0]
        live = ~s["done"]
        return {"tokens": s["tokens"].at[:, s["n"]].set(jnp.where(live, new_B, eos)), "token": new_B,
                "n": s["n"] + 1, "cache": cache, "done": s["done"] | (new_B == eos),
                "lengths": s["lengths"] + live, "logprobs": s["logprobs"] + jnp.where(live, logp_B, 0.0),
                "broken": s["broken"] | (live & broken_B)}

      state = {"tokens": jnp.full((b, width), eos, jnp.int32), "token": jnp.full((b,), start, jnp.int32),
               "n": jnp.int32(0), "cache": init_cache(cfg, b, width), "done": jnp.zeros((b,), bool),
               "lengths": jnp.zeros((b,), jnp.int32), "logprobs": jnp.zeros((b,), jnp.float32),
               "broken": jnp.zeros((b,), bool)}
      s = jax.lax.while_loop(running, step, state)
      return _replicated({k: s[k] for k in ("tokens", "lengths", "logprobs", "broken")})

    return run

  def _beam(self, b: int, width: int, beams: int):
    graphdef, cfg, eos, start = self.graphdef, self.cfg, self.eos_id, self.start_id
    n = b * beams

    def run(params, tokens_BxS, segments_BxS, alpha):
      model = nnx.merge(graphdef, params)
      cross_kv, cmask = self._encoded(model, tokens_BxS, segments_BxS)
      per_beam = lambda x: jnp.repeat(x, beams, axis=0)  # row b * beams + k: beam k of input b

      def step_fn(tokens_N, index, state):
        logits_NxV, cache, broken_N = self._step_logits(model, tokens_N, index, state["cache"], state["cross"],
                                                        state["mask"])
        return jax.nn.log_softmax(logits_NxV), {**state, "cache": cache, "broken": state["broken"] | broken_N}

      state = {"cache": init_cache(cfg, n, width), "cross": jax.tree.map(per_beam, cross_kv),
               "mask": per_beam(cmask), "broken": jnp.zeros((n,), bool)}
      result, final = beam_search(step_fn, state, batch=b, beams=beams, max_len=width, eos=eos, start=start,
                                  alpha=alpha, return_state=True)
      broken_B = jnp.any(final["broken"].reshape(b, beams), axis=1)
      return _replicated({"tokens": result.tokens, "lengths": result.lengths, "logprobs": result.logprobs,
                          "broken": broken_B})

    return run


def translator_for(objective, config, tokenizer, graphdef, params, model_config: ModelConfig, mesh) -> Translator:
  """The Translator of an encoder-decoder run: BOS starts the decoder, EOS ends it, and it may write the
  tokenizer's ids and the objective's sentinels, never the vocabulary's padding."""
  limit = tokenizer.vocab_size + objective.extra_ids(config.data)
  return Translator(graphdef, params, model_config, eos_id=tokenizer.EOS, start_id=tokenizer.BOS,
                    vocab_limit=limit, mesh=mesh, rules=tuple(config.mesh.rules))


def _replicated(out: dict) -> dict:
  """What the host reads, on every device."""
  return {k: constrain(v, (None,) * v.ndim) for k, v in out.items()}
