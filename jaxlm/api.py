"""The Python API for notebooks and scripts: train, load a workdir, generate, evaluate, plot.

    import jaxlm
    config = jaxlm.load_config("configs/default.py")
    run = jaxlm.fit(config, "/tmp/run")          # or: run = jaxlm.load("/tmp/run")
    run.plot()                                   # training and validation loss
    print(run.generate("Once upon a time", max_new_tokens=100))
    run.evaluate()                               # {'loss': ..., 'perplexity': ..., 'bits_per_byte': ...}

`jaxlm sample` and `jaxlm eval` are this API behind flags. (`fit`, not `train`: jaxlm.train is the module
of the pure train_step.)
"""

import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlm.checkpoint import abstract_like, load_params, resolve_checkpoint
from jaxlm.config import config_from_json, mesh_shape
from jaxlm.configfile import load_config_file
from jaxlm.data.store import TokenStore, is_store
from jaxlm.data.text import load_data, read_text
from jaxlm.data.tokenizer import load_tokenizer_json, padded_vocab_size
from jaxlm.errors import UserError
from jaxlm.evaluate import evaluate_tokens
from jaxlm.generate import Generator, Sampling
from jaxlm.models.gpt import ModelConfig
from jaxlm.parallel import batch_sharding, make_mesh
from jaxlm.train import plan_train_state


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


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    if not os.path.isdir(workdir):
      raise UserError(f"workdir {workdir} does not exist", "give the --workdir of a training run")
    raise UserError(f"{workdir} has no config.json, so it is not the workdir of a jaxlm run",
                    "give the --workdir you trained with")
  try:
    with open(path) as f:
      saved = json.load(f)
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
  """A trained model and what came with it. Attributes: workdir, step, config, tokenizer,
  model_config, graphdef, params (sharded over `mesh`)."""

  def __init__(self, workdir: str, step: int | None = None):
    self.workdir = workdir
    self.config = _saved_config(workdir)
    where = workdir if step is None else os.path.join(workdir, str(step))
    resolve_checkpoint(where, quiet=True)  # (no checkpoint, or none valid: said before anything is built)
    tok_path = os.path.join(workdir, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise UserError(f"{workdir} has no tokenizer.json", "train again in this workdir to write it")
    with open(tok_path) as f:
      self.tokenizer = load_tokenizer_json(f.read(), tok_path)
    self.model_config = ModelConfig.from_config(self.config.model, padded_vocab_size(self.tokenizer.vocab_size))
    self.token_bytes = np.zeros(self.model_config.vocab_size, np.float32)
    self.token_bytes[:self.tokenizer.vocab_size] = self.tokenizer.token_bytes()
    self.mesh, self.rules = _local_mesh(self.config), tuple(self.config.mesh.rules)
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      setup, init, shardings = plan_train_state(self.config, self.model_config, self.token_bytes, self.mesh)
      abstract = abstract_like(jax.eval_shape(init).params, shardings.params)
      self.params, self.step = load_params(where, abstract)
    self.graphdef = setup.graphdef
    self._generator = Generator(self.graphdef, self.params, self.model_config, eos_id=self.tokenizer.EOS,
                                vocab_limit=self.tokenizer.vocab_size, mesh=self.mesh, rules=self.rules)

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, step={self.step}, {self.model_config})"

  def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
               on_text: Callable[[int, str], None] | None = None, sample_id: int = 0) -> str | list[str]:
    """The prompt and its continuation (a list of `num_samples` texts if more than one).

    max_new_tokens: default, as many as fit the model's positions after the prompt. Temperature 0 is
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
    """(prompt ids, new tokens), or a UserError if they do not fit the model's positions."""
    ids = self.tokenizer.encode(prompt).astype(np.int32)
    new = self._generator.room(len(ids)) if max_new_tokens is None else max_new_tokens
    self._generator.check([ids], new)
    return ids, new

  def evaluate(self, data: str | None = None) -> dict:
    """Loss (nats per token), perplexity and bits per byte over every token of a text file, of a
    prepared store's validation split, or (default) of the run's own validation split."""
    tokens, source = self._eval_tokens(data)
    seq_len, batch = self.config.data.seq_len, self.config.data.batch_size
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    batch = -(-batch // shards) * shards
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      result = evaluate_tokens(self.graphdef, self.params, tokens, self.token_bytes, seq_len=seq_len,
                               batch_size=batch, sharding=batch_sharding(self.mesh, self.rules))
    return {**result, "data": source, "step": self.step}

  def _eval_tokens(self, data: str | None) -> tuple[np.ndarray, str]:
    if data is None:
      return load_data(self.config.data).val_tokens, f"{self.config.data.path or 'built-in fairy tales'} (validation)"
    if is_store(data):
      store = TokenStore(data)
      if load_tokenizer_json(store.tokenizer_json).to_json() != self.tokenizer.to_json():
        raise UserError(f"{data} was tokenized with another tokenizer than {self.workdir}",
                        "evaluate on a text file, or a store prepared with this run's tokenizer.json")
      return store.read("validation")[0], f"{data} (validation)"
    tokens = self.tokenizer.encode(read_text(data))
    if len(tokens) < 2:
      raise UserError(f"{data} is too short to evaluate", "give a file with more text")
    return tokens, data

  def metrics(self) -> list[dict]:
    """metrics.jsonl: one dict per logged step (training) or evaluation (val_*)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not os.path.isfile(path):
      return []
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def plot(self, ax=None):
    """Training and validation loss against step, on a matplotlib Axes (a new figure by default)."""
    import matplotlib.pyplot as plt

    if ax is None:
      _, ax = plt.subplots(figsize=(7, 4))
    rows = self.metrics()
    for key, label, style in (("loss", "training", "-"), ("val_loss", "validation", "o-")):
      points = [(m["step"], m[key]) for m in rows if key in m]
      if points:
        ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=os.path.basename(self.workdir.rstrip("/")))
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

