"""The Python API for notebooks and scripts: train, load a workdir, generate, evaluate, plot.

    import jaxlm
    config = jaxlm.load_config("configs/default.py")
    run = jaxlm.fit(config, "/tmp/run")          # or: run = jaxlm.load("/tmp/run")
    run.plot()                                   # training and validation loss
    print(run.generate("Once upon a time", max_new_tokens=100))
    run.evaluate()                               # {'loss': ..., 'perplexity': ..., 'bits_per_byte': ...}
    bert = jaxlm.load("/tmp/bert")               # a masked-LM run (objective mlm):
    print(bert.fill("The <mask><mask><mask> sat.", top_k=3).text)
    t5 = jaxlm.load("/tmp/t5")                   # an encoder-decoder run (objective span or seq2seq):
    print(t5.translate("Once upon a <extra_id_0>, there lived a king.", beams=4))
    gpt2 = jaxlm.import_hf("models/gpt2", "/tmp/gpt2")  # a Hugging Face folder; gpt2.export("out/") goes back

`jaxlm sample` and `jaxlm eval` are this API behind flags. (`fit`, not `train`: jaxlm.train is the module
of the pure train_step.)
"""

import json
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import files
from jaxlm.checkpoint import abstract_like, load_params, resolve_checkpoint
from jaxlm.config import config_from_json, mesh_shape
from jaxlm.configfile import load_config_file
from jaxlm.data.store import TokenStore, is_store
from jaxlm.data.text import load_data, read_text
from jaxlm.data.tokenizer import load_tokenizer_json
from jaxlm.errors import UserError
from jaxlm.evaluate import example_rows, stream_evaluator, stream_rows
from jaxlm.metrics import parse_rows
from jaxlm.generate import Generator, Sampling
from jaxlm.interop.hf_import import imported
from jaxlm.objectives import clm, mlm, span
from jaxlm.objectives.base import EVAL_STREAM, with_article
from jaxlm.parallel import Inference, batch_sharding, make_mesh
from jaxlm.train import compile_eval, plan_train_state


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config of an experiment file (configs/NAME.py, with get_config())."""
  return load_config_file(path)


def fit(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> "Run":
  """Trains (or resumes) `config` in `workdir`, as `jaxlm train` does, and loads the result."""
  from jaxlm import loop

  loop.run(config, workdir, quiet=quiet)
  return load(workdir)


def load(workdir: str, step: int | None = None) -> "Run":
  """A trained run from its workdir: config, tokenizer and parameters (the newest valid step by default)."""
  return Run(workdir, step)


def import_hf(source: str, workdir: str, *, scan_layers: bool = False) -> "Run":
  """`jaxlm import`: a local Hugging Face GPT-2 or Llama folder as the new workdir `workdir`, loaded."""
  from jaxlm.interop.hf_import import import_folder

  import_folder(source, workdir, scan_layers=scan_layers)
  return load(workdir)


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  path = files.join(workdir, "config.json")
  if not files.isfile(path):
    if not files.isdir(workdir):
      raise UserError(f"workdir {workdir} does not exist", "give the --workdir of a training run")
    raise UserError(f"{workdir} has no config.json, so it is not the workdir of a jaxlm run",
                    "give the --workdir you trained with")
  try:
    saved = json.loads(files.read_text(path))
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e})", "restore it, or train again in a new workdir") from None
  return config_from_json(saved, path)


def _local_mesh(config: ml_collections.ConfigDict):
  """The run's fsdp x tensor layout over the devices here, the rest data parallel (else all data)."""
  n = jax.device_count()
  layout = config.copy_and_resolve_references()
  layout.mesh.data = -1
  try:
    return make_mesh(mesh_shape(layout, n))
  except UserError:  # (e.g. trained with tensor=4, sampled on 2 devices)
    return make_mesh((n, 1, 1))


class Run:
  """A trained model and what came with it. Attributes: workdir, step, config, objective, tokenizer,
  model_config, graphdef, params (sharded over `mesh`). A decoder run (objective clm) generates, an
  encoder run (mlm) fills masks, an encoder-decoder run (span, seq2seq) translates; all evaluate."""

  def __init__(self, workdir: str, step: int | None = None):
    self.workdir = workdir
    self.config = _saved_config(workdir)
    where = workdir if step is None else files.join(workdir, str(step))
    resolve_checkpoint(where, quiet=True)  # (no checkpoint, or none valid: said before anything is built)
    tok_path = files.join(workdir, "tokenizer.json")
    if not files.isfile(tok_path):
      raise UserError(f"{workdir} has no tokenizer.json", "train again in this workdir to write it")
    self.tokenizer = load_tokenizer_json(files.read_text(tok_path), tok_path)
    from jaxlm.loop import model_for

    self.model_config, self.token_bytes = model_for(self.config, self.tokenizer)
    self.mesh, self.rules = _local_mesh(self.config), tuple(self.config.mesh.rules)
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      setup, init, shardings = plan_train_state(self.config, self.model_config, self.token_bytes, self.mesh)
      abstract = abstract_like(jax.eval_shape(init).params, shardings.params)
      self.params, self.step = load_params(where, abstract)
    self.graphdef, self.objective, self._setup, self._shardings = setup.graphdef, setup.objective, setup, shardings
    self._evaluator = None  # built (and compiled) by the first evaluate()
    tok, kind = self.tokenizer, self.objective.prompt_kind
    if kind == "continue":
      self._generator = Generator(self.graphdef, self.params, self.model_config, eos_id=tok.EOS,
                                  vocab_limit=tok.vocab_size, mesh=self.mesh, rules=self.rules)
    elif kind == "fill":
      self._filler = mlm.Filler(self.graphdef, self.params, tok, self.model_config.vocab_size,
                                self.model_config.max_seq_len, Inference(self.mesh, self.rules))
    else:
      from jaxlm.translate import translator_for

      self._sentinels = self.objective.extra_ids(self.config.data)
      self._translator = translator_for(self.objective, self.config, tok, self.graphdef, self.params,
                                        self.model_config, self.mesh)

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, step={self.step}, {self.model_config})"

  def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
               on_text: Callable[[int, str], None] | None = None, sample_id: int = 0) -> str | list[str]:
    """The prompt and its continuation (a list of `num_samples` texts if more than one).

    max_new_tokens: default, as many as fit the model's positions after the prompt; more than that slide
    the context past them (generate.py: the newest 3/4 of the window is prefilled again). Temperature 0 is
    greedy. `on_text(sample, text)` receives each sample's new text as it is decoded; samples are
    then generated one after another (the same texts as a batch: each has its own random stream).
    Sample i uses random stream sample_id + i. Afterwards `filled_positions` says whether a text
    stopped only because the model's positions ran out.
    """
    ids, new = self.check_prompt(prompt, max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p).check()
    if on_text is None:
      outs = self._generator.generate([ids] * num_samples, max_new_tokens=new, sampling=sampling, seed=seed,
                                      sample_ids=range(sample_id, sample_id + num_samples))
    else:
      outs = []
      for i in range(num_samples):
        printer = _TextStream(self.tokenizer, lambda text, i=i: on_text(i, text))
        outs += self._generator.generate([ids], max_new_tokens=new, sampling=sampling, seed=seed,
                                         sample_ids=[sample_id + i], on_tokens=lambda rows: printer(rows[0]),
                                         chunk=16)  # (each call costs ~1 ms)
        printer.finish()
    # Ran to the end of the positions rather than to EOS (or to a length the caller asked for):
    self.filled_positions = max_new_tokens is None and any(len(o) == new for o in outs)
    texts = [prompt + self.tokenizer.decode(o) for o in outs]
    return texts[0] if num_samples == 1 else texts

  def check_prompt(self, prompt: str, max_new_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(prompt ids, new tokens), or a UserError if this run does not continue text or they do not fit
    the model's positions."""
    self._needs("continue", "generate")
    if mlm.MASK_TEXT in prompt:
      raise UserError(f"the prompt has {mlm.MASK_TEXT}, but {self.workdir} is a decoder (objective "
                      f"{self.objective.name}): it continues text, it does not fill masks",
                      "give a prompt without <mask>, or sample a run trained with --config.objective=mlm")
    ids = clm.prompt_ids(self.tokenizer, prompt, self.config.data.sequences == "packed")
    new = self._generator.room(len(ids)) if max_new_tokens is None else max_new_tokens
    self._generator.check([ids], new)
    return ids, new

  def fill(self, prompt: str, *, top_k: int = 0) -> mlm.Filled:
    """Every `<mask>` of the prompt filled with its most likely token (an encoder run, objective mlm):
    `.text`, and `.candidates`: per mask, the `top_k` most likely (token text, probability)."""
    self._needs("fill", "fill")
    if top_k < 0:
      raise UserError(f"top_k must be 0 or more, got {top_k}", "e.g. --top_k=5; 0 shows none")
    return self._filler(prompt, top_k)

  def translate(self, prompts: str | list[str], *, max_new_tokens: int | None = None, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int = 0, beams: int = 1, alpha: float | None = None,
                sample_id: int = 0) -> str | list[str]:
    """The decoded target of each input (an encoder-decoder run, objective span or seq2seq): one text
    for one prompt, a list for a list (inputs of any lengths, decoded as one batch).

    Greedy by default; temperature > 0 samples (with top_k, top_p); beams > 1 is beam search with t5x's
    length penalty `alpha` (default 0.6), deterministic. A span run's prompts and targets write its
    sentinels as <extra_id_0>, <extra_id_1>, ... max_new_tokens: default, the run's data.target_len.
    """
    from jaxlm.translate import DEFAULT_ALPHA

    self._needs("translate", "translate")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, new = self.check_inputs(texts, max_new_tokens, beams)
    sampling = Sampling(temperature, top_k, top_p).check()
    if beams > 1 and (temperature > 0 or top_k or top_p < 1.0):
      raise UserError(f"beam search (beams={beams}) is deterministic; temperature, top_k and top_p sample",
                      "drop the sampling settings for beam search, or use beams=1 to sample")
    outs, _ = self._translator.translate(ids, max_new_tokens=new, sampling=sampling, seed=seed, beams=beams,
                                         alpha=DEFAULT_ALPHA if alpha is None else alpha,
                                         sample_ids=range(sample_id, sample_id + len(ids)))
    decoded = [self.decode_target(o) for o in outs]
    return decoded[0] if isinstance(prompts, str) else decoded

  def check_inputs(self, texts: list[str], max_new_tokens: int | None = None, beams: int = 1):
    """(each input's ids, new tokens), or a UserError if they do not fit the model's positions."""
    self._needs("translate", "translate")
    if self._sentinels:
      ids = [span.encode_prompt(self.tokenizer, t, self._sentinels) for t in texts]
    else:
      ids = [self.tokenizer.encode(t).astype(np.int32) for t in texts]
    ids = [np.append(i, np.int32(self.tokenizer.EOS)) if len(i) else i for i in ids]  # (as in training)
    new = self.objective.decoder_len(self.config.data) if max_new_tokens is None else max_new_tokens
    self._translator.check(ids, new, beams)
    return ids, new

  def decode_target(self, ids) -> str:
    """A decoded target as text (a span run's sentinels as <extra_id_N>)."""
    return span.decode_text(self.tokenizer, ids, self._sentinels)

  def _needs(self, kind: str, what: str) -> None:
    if self.objective.prompt_kind != kind:
      other = {"continue": "generate", "fill": "fill", "translate": "translate"}[self.objective.prompt_kind]
      family = with_article(self.objective.family)
      raise UserError(f"{self.workdir} is {family} run (objective {self.objective.name}); "
                      f"it cannot {what}", f"use {other}() (`jaxlm sample` picks it by itself)")

  def evaluate(self, data: str | None = None, *, max_examples: int = 100) -> dict:
    """The objective's metrics over every token of a text file, of a prepared store's validation split,
    or (default) of the run's own validation split: loss (nats per counted token), perplexity, bits per
    byte, and accuracy for a masked LM (over masks drawn from the run's seed, the same every call) and an
    encoder-decoder (of the targets' tokens). For a seq2seq run, also `exact_match`: the share of the
    first `max_examples` validation pairs (0: all) whose greedy decoding is exactly the target.
    The eval step compiles once per Run."""
    if max_examples < 0:
      raise UserError(f"max_examples must be 0 (all) or more, got {max_examples}", "e.g. --max_examples=100")
    tokens, weights, offsets, source, pairs = self._eval_tokens(data)
    self.objective.check_data(pairs, source)
    c = self.config
    offsets_for_rows = offsets if c.data.sequences == "packed" else None  # (else: windows of the stream)
    batch = c.data.batch_size
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    batch = -(-batch // shards) * shards
    sharding = batch_sharding(self.mesh, self.rules)
    if self._evaluator is None:
      step = compile_eval(self._setup, self._shardings.params, sharding)
      self._evaluator = stream_evaluator(step, self.objective, self.tokenizer, c.seed, sharding, batch, c.data)
    packer = (self.objective.example_packer(offsets, weights, c.data, c.seed, EVAL_STREAM, shuffle=False)
              if self.objective.packs_examples else None)  # (check_data: a pairs store)
    where = jax.process_index(), jax.process_count()
    rows = (example_rows(packer, tokens, weights, batch, *where) if packer is not None else
            stream_rows(tokens, self.objective.row_len(c.data), batch, *where, weights, offsets_for_rows))
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      result = self._evaluator.evaluate(self.params, rows)
    kind = self.objective.prompt_kind
    counted = ("masked tokens" if kind == "fill" else "target tokens" if kind == "translate" else
               "every token" if weights is None else "tokens of weight 1 (responses)")
    result = {**result, "data": source, "step": self.step, "objective": self.objective.name, "counted": counted}
    if packer is not None:
      result["exact_match"], result["examples"] = self._exact_match(tokens, weights, offsets, max_examples)
    return result

  def _exact_match(self, tokens, weights, offsets, max_examples: int) -> tuple[float, int]:
    """The share of the split's first examples whose greedy decoding equals their target (EOS aside)."""
    from jaxlm.data.pairs import split_example

    count = len(offsets) - 1 if max_examples == 0 else min(max_examples, len(offsets) - 1)
    new, seq_len, eos = self.objective.decoder_len(self.config.data), self.config.data.seq_len, self.tokenizer.EOS
    hits, chunk = 0, 32  # inputs decoded per batch (the last batch repeats an input to keep its shape)
    for first in range(0, count, chunk):
      pairs = [split_example(tokens[offsets[d]:offsets[d + 1]], weights[offsets[d]:offsets[d + 1]], eos)
               for d in range(first, min(first + chunk, count))]
      inputs = [x[:seq_len] for x, _ in pairs]  # (truncated as in training)
      outs, _ = self._translator.translate(inputs + inputs[:1] * (chunk - len(inputs)), max_new_tokens=new,
                                           sampling=Sampling(temperature=0.0))
      hits += sum(np.array_equal(o, t[t != eos]) for o, (_, t) in zip(outs, pairs))
    return hits / max(count, 1), count

  def _eval_tokens(self, data: str | None):
    """(tokens, their loss weights or None, where each document starts, a description, the pairs
    store's fields or None)."""
    if data is None:
      if imported(self.workdir) is not None:
        raise UserError(f"{self.workdir} was imported from Hugging Face and has no validation split of its own",
                        "give --data=a text file, or a store prepared with its tokenizer.json")
      corpus = load_data(self.config.data)
      offsets = corpus.val_offsets if corpus.val_offsets is not None else np.array([0, len(corpus.val_tokens)])
      return (corpus.val_tokens, corpus.val_weights, offsets,
              f"{self.config.data.path or 'built-in fairy tales'} (validation)", corpus.pairs)
    if is_store(data):
      store = TokenStore(data)
      if load_tokenizer_json(store.tokenizer_json).to_json() != self.tokenizer.to_json():
        raise UserError(f"{data} was tokenized with another tokenizer than {self.workdir}",
                        "evaluate on a text file, or a store prepared with this run's tokenizer.json")
      weights = store.read_weights("validation") if store.pairs is not None else None
      tokens, offsets = store.read("validation")
      return tokens, weights, offsets, f"{data} (validation)", store.pairs
    tokens = self.tokenizer.encode(read_text(data))
    if len(tokens) < 2:
      raise UserError(f"{data} is too short to evaluate", "give a file with more text")
    return tokens, None, np.array([0, len(tokens)]), data, None

  def metrics(self) -> list[dict]:
    """metrics.jsonl: one dict per logged step (training) or evaluation (val_*)."""
    path = files.join(self.workdir, "metrics.jsonl")
    if not files.isfile(path):
      return []
    return parse_rows(files.read_text(path))

  def export(self, target: str, *, dtype: str = "float32") -> dict:
    """`jaxlm export`: this decoder as a Hugging Face folder (transformers' from_pretrained loads it)."""
    from jaxlm.interop.hf_export import DTYPES, export_run

    if dtype not in DTYPES:
      raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", "e.g. dtype='bfloat16'")
    return export_run(self, target, dtype)

  def plot(self, ax=None):
    """Training and validation loss against step, on a matplotlib Axes (a new figure by default)."""
    import matplotlib.pyplot as plt

    from jaxlm.plots import draw_losses

    if ax is None:
      _, ax = plt.subplots(figsize=(7, 4))
    draw_losses(ax, self.metrics())
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=files.split(self.workdir.rstrip("/"))[1])
    ax.legend()
    return ax


class _TextStream:
  """Turns a growing list of token ids into newly decoded text, holding back a partial character."""

  def __init__(self, tokenizer, emit: Callable[[str], None]):
    self.tokenizer, self.emit, self.shown, self.ids = tokenizer, emit, "", []

  def __call__(self, ids) -> None:
    self.ids = list(ids)
    text = self.tokenizer.decode(np.asarray(self.ids, np.int32))
    stable = text.rstrip("\ufffd")  # maybe the first bytes of a character still being decoded
    if len(stable) > len(self.shown) and stable.startswith(self.shown):
      self.emit(stable[len(self.shown):])
      self.shown = stable

  def finish(self) -> None:
    text = self.tokenizer.decode(np.asarray(self.ids, np.int32))
    if text.startswith(self.shown) and len(text) > len(self.shown):
      self.emit(text[len(self.shown):])
    self.shown = text

