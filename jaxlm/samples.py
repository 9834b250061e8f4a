"""What a run shows at the end of training, per its objective: a continuation of the sample prompt (a
decoder), or the masks of a prompt filled (an encoder)."""


from jaxlm import generate
from jaxlm.objectives import clm, mlm
from jaxlm.parallel import Inference


def end_sample(config, corpus, setup, params, model_config, mesh) -> str:
  """The sample printed when training ends (train.sample_tokens: how long)."""
  rules = tuple(config.mesh.rules)
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
  """The prompt and up to train.sample_tokens of continuation (as many as fit the model's positions)."""
  prompt = clm.prompt_ids(tokenizer, config.train.sample_prompt, config.data.sequences == "packed")
  generator = generate.Generator(setup.graphdef, params, model_config, eos_id=tokenizer.EOS,
                                 vocab_limit=tokenizer.vocab_size, mesh=mesh, rules=rules)
  room = generator.room(len(prompt))
  if room < 1 or len(prompt) == 0:
    return f"(no room after a prompt of {len(prompt)} tokens in {model_config.max_seq_len} positions)"
  wanted = min(config.train.sample_tokens, room)
  new = generator.generate([prompt], max_new_tokens=wanted, sampling=generate.Sampling(temperature=0.8),
                           seed=config.seed)[0]
  text = config.train.sample_prompt + tokenizer.decode(new)
  if len(new) == room < config.train.sample_tokens:
    text += "\n" + generate.positions_full(model_config.max_seq_len)
  return text


