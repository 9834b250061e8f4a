"""What a run shows at the end of training, per its objective: a continuation of the sample prompt (a
decoder), the masks of a prompt filled (an encoder), or a validation input's target decoded next to the
true one (an encoder-decoder)."""

import numpy as np

from jaxlm import generate
from jaxlm.objectives import clm, mlm
from jaxlm.parallel import Inference


def end_sample(config, corpus, setup, params, model_config, mesh) -> str:
  """The sample printed when training ends (train.sample_tokens: how long)."""
  rules = tuple(config.mesh.rules)
  if setup.objective.prompt_kind == "translate":
    return _translation(config, corpus, setup, params, model_config, mesh)
  if setup.objective.prompt_kind == "fill":
    prompt = config.train.sample_prompt
    if mlm.MASK_TEXT not in prompt:
      prompt = mlm.demo_prompt(corpus.tokenizer, corpus.val_tokens, config.seed,
                               min(config.train.sample_tokens, model_config.max_seq_len))
    filler = mlm.Filler(setup.graphdef, params, corpus.tokenizer, model_config.vocab_size,
                        model_config.max_seq_len, Inference(mesh, rules))
    return f"{prompt}\n-> {filler(prompt).text}"
  return _continuation(config, corpus.tokenizer, setup, params, model_config, mesh, rules)


def _continuation(config, tokenizer, setup, params, model_config, mesh, rules) -> str:
  """The prompt and up to train.sample_tokens of continuation (past the model's positions, the context
  slides)."""
  prompt = clm.prompt_ids(tokenizer, config.train.sample_prompt, config.data.sequences == "packed")
  generator = generate.Generator(setup.graphdef, params, model_config, eos_id=tokenizer.EOS,
                                 vocab_limit=tokenizer.vocab_size, mesh=mesh, rules=rules)
  if generator.room(len(prompt)) < 1 or len(prompt) == 0:
    return f"(no room after a prompt of {len(prompt)} tokens in {model_config.max_seq_len} positions)"
  new = generator.generate([prompt], max_new_tokens=config.train.sample_tokens,
                           sampling=generate.Sampling(temperature=0.8), seed=config.seed)[0]
  return config.train.sample_prompt + tokenizer.decode(new)


def _translation(config, corpus, setup, params, model_config, mesh) -> str:
  """A validation input (span: a corrupted stretch of text, or the sample prompt if it has sentinels;
  seq2seq: the first pair), its greedy decoding and the true target."""
  from jaxlm.data.pairs import split_example
  from jaxlm.objectives import span
  from jaxlm.objectives.base import VAL_STREAM
  from jaxlm.translate import translator_for

  objective, tok, data = setup.objective, corpus.tokenizer, config.data
  sentinels = objective.extra_ids(data)
  if corpus.pairs is not None:
    end = corpus.val_offsets[1]
    inputs, truth = split_example(corpus.val_tokens[:end], corpus.val_weights[:end], tok.EOS)
    inputs = inputs[:data.seq_len]
  elif "<extra_id_" in config.train.sample_prompt:
    inputs = np.append(span.encode_prompt(tok, config.train.sample_prompt, sentinels), np.int32(tok.EOS))
    truth = None
  else:
    raw = np.asarray(corpus.val_tokens[:objective.row_len(data) + 1], np.int32)[None]
    batch = objective.transform(tok, config.seed, VAL_STREAM, data)({"tokens": raw}, 0, 0)
    inputs, truth = batch["inputs"][0], batch["targets"][0]
  translator = translator_for(objective, config, tok, setup.graphdef, params, model_config, mesh)
  new = objective.decoder_len(data)
  out = translator.translate([inputs], max_new_tokens=new, sampling=generate.Sampling(temperature=0.0))[0][0]
  text = lambda ids: span.decode_text(tok, np.asarray(ids)[np.asarray(ids) != tok.EOS], sentinels)
  shown = f"{text(inputs)}\n-> {text(out)}"
  return shown + (f"\n(true target: {text(truth)})" if truth is not None else "")
