"""The training loop: the I/O edge around the pure train_step.

It validates the config, loads data, builds the sharded state (or resumes it from the workdir),
then drives train_step, evaluation, logging and checkpoints, and prints a sample at the end.
"""

import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import generate
from jaxlm.checkpoint import Checkpoints, abstract_like
from jaxlm.config import to_json, validate
from jaxlm.data.text import eval_batches, load_corpus, train_batch
from jaxlm.data.tokenizer import ByteTokenizer, padded_vocab_size
from jaxlm.errors import UserError
from jaxlm.metrics import MetricsLog, Progress, flops_per_token, param_count
from jaxlm.models.gpt import ModelConfig
from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
from jaxlm.train import compile_steps, create_train_state


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror}",
                    "choose another --workdir or fix its permissions") from None


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir`; returns the last training and evaluation metrics."""
  shape = validate(config, jax.device_count())
  prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  progress = Progress(config.train.steps, enabled=is_chief and not quiet)

  tokenizer = ByteTokenizer()
  train_tokens, val_tokens, source = load_corpus(config.data, tokenizer)
  model_config = ModelConfig.from_config(config.model, padded_vocab_size(tokenizer.vocab_size))
  if model_config.vocab_size < tokenizer.vocab_size:
    raise UserError(f"model.vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                    f"{tokenizer.vocab_size}", "set --config.model.vocab_size=0 to follow the tokenizer")
  token_bytes = np.zeros(model_config.vocab_size, np.float32)
  token_bytes[: tokenizer.vocab_size] = tokenizer.token_bytes()

  mesh, rules = make_mesh(shape), tuple(config.mesh.rules)
  c, b, t = config.train, config.data.batch_size, config.data.seq_len
  batch_kwargs = dict(seq_len=t, batch_size=b, seed=config.seed, process_index=jax.process_index(),
                      process_count=jax.process_count())
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    setup, state, shardings = create_train_state(config, model_config, token_bytes, mesh)
    checkpoints = Checkpoints(workdir, c.keep_checkpoints)
    if (latest := checkpoints.latest_step()) is not None:
      state = checkpoints.restore(latest, abstract_like(state, shardings))
      progress.message(f"resumed from {checkpoints.directory}/{latest}")
    if is_chief:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(to_json(config))
    progress.message(f"{source}: {len(train_tokens):,} training / {len(val_tokens):,} validation "
                     f"tokens; model {param_count(model_config):,} parameters; mesh "
                     f"data={shape[0]} fsdp={shape[1]} tensor={shape[2]} on {jax.device_count()} "
                     f"{jax.devices()[0].platform} devices")

    sharding = batch_sharding(mesh, rules)
    train, evaluate = compile_steps(setup, shardings, sharding)
    val_batches = [to_global_batch(x, sharding) for x in
                   eval_batches(val_tokens, num_batches=c.eval_batches, **batch_kwargs)]
    log = MetricsLog(workdir, enabled=is_chief)
    last: dict[str, float] = {}

    def evaluate_now(step: int) -> None:
      total = {}
      for x in val_batches:  # fetched one by one: one program in flight, as in training
        for k, v in jax.device_get(evaluate(state.params, x)).items():
          total[k] = total.get(k, 0.0) + float(v)
      val_loss = total["loss_sum"] / total["tokens"]
      last.update(val_loss=val_loss, val_ppl=float(np.exp(val_loss)),
                  val_bpb=total["loss_sum"] / (np.log(2) * max(total["bytes"], 1.0)))
      log.write(step, val_loss=last["val_loss"], val_ppl=last["val_ppl"], val_bpb=last["val_bpb"])
      progress.message(f"step {step:>6d}  val_loss {val_loss:.4f}  val_ppl {last['val_ppl']:.2f}  "
                       f"val_bpb {last['val_bpb']:.4f}")

    start = int(state.step)
    step_seconds: list[float] = []
    previous = None  # metrics of the step dispatched before this one
    tick = time.monotonic()
    for step in range(start, c.steps):
      batch = to_global_batch(train_batch(train_tokens, step, **batch_kwargs), sharding)
      state, metrics = train(state, batch)
      # Keep one step in flight: wait for the previous one (on CPU meshes, an unbounded queue of
      # collectives can deadlock; on accelerators this still overlaps host work with the device).
      if previous is not None:
        jax.block_until_ready(previous)
      previous = metrics
      now = time.monotonic()
      if step == start:
        progress.message(f"first step compiled and dispatched in {now - tick:.1f} s")
      else:
        step_seconds.append(now - tick)
      tick = now
      done = step + 1
      if done % c.log_every == 0 or done == c.steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        sec = statistics.median(step_seconds[-c.log_every:]) if step_seconds else float("nan")
        values["tokens_per_sec"] = b * t / sec if step_seconds else 0.0
        log.write(done, **values)
        last.update(values)
        progress.update(done, values["loss"], values["lr"], values["tokens_per_sec"], sec)
      if done % c.eval_every == 0 or done == c.steps:
        evaluate_now(done)
      if done % c.checkpoint_every == 0 or done == c.steps:
        checkpoints.save(done, state)
      if done % c.eval_every == 0 or done % c.checkpoint_every == 0:
        tick = time.monotonic()  # evaluation and saving are not training time
    checkpoints.close()
    if step_seconds:
      sec = statistics.median(step_seconds)
      flops = flops_per_token(model_config, t) * b * t / sec
      last["step_seconds"] = sec
      progress.message(f"median step {sec * 1e3:.1f} ms, {b * t / sec:,.0f} tokens/s, "
                       f"{flops / 1e9:.1f} model GFLOP/s")
    if c.sample_tokens and is_chief:
      prompt = tokenizer.encode(c.sample_prompt)
      ids = generate.sample(setup.graphdef, state.params, prompt, c.sample_tokens, context=t,
                            key=jax.random.PRNGKey(config.seed), temperature=0.8,
                            vocab_limit=tokenizer.vocab_size)
      progress.message("sample:\n" + tokenizer.decode(ids))
  return last
