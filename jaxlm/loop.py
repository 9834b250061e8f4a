"""The training loop: the I/O edge around the pure train_step.

It validates the config, loads data, builds the sharded state (or resumes it from the workdir),
then drives train_step, evaluation, logging and checkpoints, and prints a sample at the end. A rerun
on the same workdir continues exactly where the newest valid checkpoint left off.
"""

import json
import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import generate
from jaxlm.checkpoint import Checkpoints, abstract_like, load_params, resolve_checkpoint
from jaxlm.config import resume_changes, to_json, validate
from jaxlm.data.text import load_data
from jaxlm.data.tokenizer import padded_vocab_size, save_tokenizer
from jaxlm.errors import UserError
from jaxlm.metrics import MetricsLog, Progress, flops_per_token, param_count
from jaxlm.models.gpt import ModelConfig
from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
from jaxlm.preemption import StopSignals, stop_requested
from jaxlm.train import compile_steps, plan_train_state


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror}",
                    "choose another --workdir or fix its permissions") from None


def _saved_config(workdir: str) -> dict | None:
  """The config of the run whose checkpoints are in `workdir`, or None if it has no checkpoints."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    return None
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # the checkpoints' own shapes are checked when they are restored


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir`; returns the last training and evaluation metrics.

  SIGTERM or SIGINT stops it cleanly after the current step with a checkpoint saved there; the
  returned dict then has `stopped_at`.
  """
  shape = validate(config, jax.device_count())
  prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  progress = Progress(config.train.steps, enabled=is_chief and not quiet)
  if (saved := _saved_config(workdir)) is not None:
    if changes := resume_changes(saved, config, workdir):
      progress.message("resuming with changed settings: " + "; ".join(changes))
  elif config.init_from:
    resolve_checkpoint(config.init_from)  # a bad path fails now, not after the data is loaded

  corpus = load_data(config.data)
  tokenizer, val_tokens = corpus.tokenizer, corpus.val_tokens
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
  log = MetricsLog(workdir, enabled=is_chief)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), StopSignals() as signals:
    setup, init, shardings = plan_train_state(config, model_config, token_bytes, mesh)
    data = corpus.train_batches(workers=config.data.loader_workers, **batch_kwargs)
    checkpoints = Checkpoints(workdir, c.keep_checkpoints, c.keep_best)
    if restored := checkpoints.restore_latest(abstract_like(jax.eval_shape(init), shardings), data):
      state, step = restored
      data.step = step  # (what the saved iterator state says, unless saved by another number of processes)
      log.drop_after(step)
      progress.message(f"resumed from {checkpoints.directory}/{step}")
      if config.init_from:
        progress.message(f"(init_from={config.init_from} applies to a fresh run only; resuming)")
    else:
      state = init()
      if config.init_from:
        params = load_params(config.init_from, abstract_like(state.params, shardings.params))
        state = state.replace(params=params)
        progress.message(f"parameters from {config.init_from}")
    if is_chief:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(to_json(config))
      save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer.json"))
    progress.message(f"{corpus.source}: {corpus.train_count:,} training / {len(val_tokens):,} validation "
                     f"tokens; model {param_count(model_config):,} parameters; mesh "
                     f"data={shape[0]} fsdp={shape[1]} tensor={shape[2]} on {jax.device_count()} "
                     f"{jax.devices()[0].platform} devices")

    sharding = batch_sharding(mesh, rules)
    train, evaluate = compile_steps(setup, shardings, sharding)
    val_batches = [to_global_batch(x, sharding) for x in
                   corpus.eval_batches(num_batches=c.eval_batches, **batch_kwargs)]
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
    save_seconds: list[float] = []  # how long each save held up the loop
    previous = None  # metrics of the step dispatched before this one
    tick = time.monotonic()
    for step in range(start, c.steps):
      batch = to_global_batch(next(data), sharding)
      state, metrics = train(state, batch)
      # Keep one step in flight: wait for the previous one (on CPU meshes, an unbounded queue of
      # collectives can deadlock; on accelerators this still overlaps host work with the device).
      if previous is not None:
        jax.block_until_ready(previous)
      previous = metrics
      now = time.monotonic()
      if step == start:
        progress.message(f"first step compiled and dispatched in {now - tick:.1f} s")
        loop_start = now
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
      evaluated = done % c.eval_every == 0 or done == c.steps
      if evaluated:
        evaluate_now(done)
      stop = stop_requested(signals)
      if done % c.checkpoint_every == 0 or done == c.steps or stop:
        jax.block_until_ready(state)  # (waiting for the step is training; the save starts after it)
        begin = time.monotonic()
        checkpoints.save(done, state, data, val_loss=last["val_loss"] if evaluated else None)
        save_seconds.append(time.monotonic() - begin)
      if evaluated or done % c.checkpoint_every == 0:
        tick = time.monotonic()  # evaluation and saving are not training time
      if stop:
        last["stopped_at"] = done
        break
    if start < c.steps:
      last["loop_seconds"] = time.monotonic() - loop_start  # after the first step, saves included
    checkpoints.close()
    if step_seconds:
      sec = statistics.median(step_seconds)
      flops = flops_per_token(model_config, t) * b * t / sec
      last["step_seconds"] = sec
      progress.message(f"median step {sec * 1e3:.1f} ms, {b * t / sec:,.0f} tokens/s, "
                       f"{flops / 1e9:.1f} model GFLOP/s")
    if len(save_seconds) > 1:  # the first save also sets orbax up
      last["save_seconds"] = statistics.median(save_seconds[1:])
    if "stopped_at" in last:
      by = signals.received or "a signal to another process"
      progress.message(f"stopped by {by} after step {last['stopped_at']}; checkpoint "
                       f"saved; run the same command again to resume")
      return last
    if c.sample_tokens:
      progress.message("sample:\n" + end_sample(config, tokenizer, setup, state.params, model_config, mesh))
  return last


def end_sample(config, tokenizer, setup, params, model_config, mesh) -> str:
  """The prompt and up to train.sample_tokens of continuation (as many as fit the model's positions)."""
  prompt = tokenizer.encode(config.train.sample_prompt).astype(np.int32)
  generator = generate.Generator(setup.graphdef, params, model_config, eos_id=tokenizer.EOS,
                                 vocab_limit=tokenizer.vocab_size, mesh=mesh, rules=tuple(config.mesh.rules))
  room = generator.room(len(prompt))
  if room < 1 or len(prompt) == 0:
    return f"(no room after a prompt of {len(prompt)} tokens in {model_config.max_seq_len} positions)"
  new = generator.generate([prompt], max_new_tokens=min(config.train.sample_tokens, room),
                           sampling=generate.Sampling(temperature=0.8), seed=config.seed)[0]
  return config.train.sample_prompt + tokenizer.decode(new)
  return last
