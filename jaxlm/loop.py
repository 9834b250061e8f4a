"""The training loop: the I/O edge around the pure train_step, as labelled phases.

`run` validates the config, takes the workdir, loads the data, then a `Trainer` restores or
initialises the sharded state, drives train_step with a step timer, evaluates, logs, and saves or stops
per its checkpoint policy, and prints a sample at the end. A rerun on the same workdir continues exactly
where the newest valid checkpoint left off. A non-finite loss, gradient norm or validation loss stops
the run at that step (exit 3) with nothing non-finite saved.
"""

import dataclasses
import math
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import files, init_from, objectives, plots, storage_errors
from jaxlm.checkpoint import Checkpoints, abstract_like, load_params
from jaxlm.config import profile_window, resolved, resume_changes, to_json, validate
from jaxlm.data.text import Corpus, first_row, load_data
from jaxlm.data.tokenizer import padded_vocab_size, save_tokenizer
from jaxlm.errors import RunFailed, UserError
from jaxlm.evaluate import Evaluator
from jaxlm.flops import model_flops_per_token
from jaxlm.hardware import peak_flops_per_device
from jaxlm.interop.hf_import import imported
from jaxlm.metrics import MetricsLog, Progress, flops_per_token, param_count, si
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives.base import TRAIN_STREAM, VAL_STREAM
from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
from jaxlm.preemption import StopSignals, stop_requested
from jaxlm.profiling import StepProfiler
from jaxlm.samples import end_sample
from jaxlm.train import compile_steps, plan_train_state
from jaxlm.watchdog import Watchdog
from jaxlm.workdir import Workdir, saved_config


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir`; returns the last training and evaluation metrics.

  SIGTERM or SIGINT stops it cleanly after the current step with a checkpoint saved there; the
  returned dict then has `stopped_at`. One run per workdir: a second one is a UserError.
  """
  config, adopted = init_from.adopt_model(config, workdir)
  config, notes, shape, objective = checked(config, jax.device_count())
  progress = Progress(config.train.steps, enabled=jax.process_index() == 0 and not quiet)
  for note in notes:
    progress.message(f"note: {note}")
  if adopted:
    progress.message(f"model settings of init_from={config.init_from}: {', '.join(adopted)}")
  with Workdir(workdir) as hold:
    if hold.existed:
      hold.lock()  # before reading what is there: another run may be writing it
    _check_start(config, workdir, progress)
    corpus = load_data(config.data)
    objective.check_data(corpus.pairs, corpus.source)
    if config.init_from and saved_config(workdir) is None:
      init_from.check_tokenizer(config, corpus.tokenizer)
    model_config, token_bytes = model_for(config, corpus.tokenizer, tensor=shape[2])
    hold.lock()  # (a new workdir is created only now, after the data and config checks)
    mesh, rules = make_mesh(shape), tuple(config.mesh.rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), StopSignals() as signals:
      trainer = Trainer(config, workdir, corpus, model_config, token_bytes, mesh, progress, signals)
      return trainer.run()


def checked(config, num_devices: int):
  """(config resolved, its notes, the mesh shape, the objective): every check of a config before its data
  is read (UserErrors), as `jaxlm train` and `jaxlm plan` make them."""
  config, notes = resolved(config)
  shape = validate(config, num_devices)
  objective = objectives.get(config.objective)
  objective.check_config(config)
  return config, notes, shape, objective


def _check_start(config, workdir: str, progress: Progress) -> None:
  """Config changes against the run being resumed (a shape change is an error), or init_from's path."""
  if files.isdir(workdir) and imported(workdir) is not None:
    raise UserError(f"{workdir} holds a model imported by `jaxlm import` (parameters only: no optimizer "
                    "state, no data of its own)", f"fine-tune it in a new workdir: --workdir=NEW "
                    f"--config.init_from={workdir}")
  if (saved := saved_config(workdir)) is not None:
    if changes := resume_changes(saved, config, workdir):
      progress.message("resuming with changed settings: " + "; ".join(changes))
  elif config.init_from:
    init_from.check_family(config, init_from.source_workdir(config.init_from))


def model_for(config, tokenizer, tensor: int = 1) -> tuple[ModelConfig, np.ndarray]:
  """The model's config for this tokenizer (and the ids the objective adds, e.g. sentinels), and the bytes
  of text per token id (for bits per byte)."""
  extra = objectives.get(config.objective).extra_ids(config.data)
  ids = tokenizer.vocab_size + extra
  model_config = ModelConfig.from_config(config.model, padded_vocab_size(ids))
  if model_config.vocab_size < ids:
    sentinels = f" and the objective's {extra} sentinels" if extra else ""
    raise UserError(f"model.vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                    f"{tokenizer.vocab_size}{sentinels}", "set --config.model.vocab_size=0 to follow the tokenizer")
  if model_config.vocab_size % tensor:
    raise UserError(f"the vocabulary of {model_config.vocab_size} is not divisible by mesh.tensor {tensor}",
                    "choose a tensor-parallel size that divides it, or set model.vocab_size")
  token_bytes = np.zeros(model_config.vocab_size, np.float32)
  token_bytes[: tokenizer.vocab_size] = tokenizer.token_bytes()
  return model_config, token_bytes


@dataclasses.dataclass
class StepTimer:
  """Wall time per training step, leaving out the first (compile) and any evaluation or save."""

  seconds: list[float] = dataclasses.field(default_factory=list)
  saves: list[float] = dataclasses.field(default_factory=list)  # how long each save held up the loop
  tick: float = dataclasses.field(default_factory=time.monotonic)
  started: float | None = None  # when the first step had been dispatched

  def stepped(self) -> float | None:
    """Marks a step dispatched; returns the first step's compile-and-dispatch time, else None."""
    now, first = time.monotonic(), None
    if self.started is None:
      self.started, first = now, now - self.tick
    else:
      self.seconds.append(now - self.tick)
    self.tick = now
    return first

  def pause(self) -> None:
    """Time since the last step is not training (evaluation, saving)."""
    self.tick = time.monotonic()

  def median(self, last: int | None = None) -> float:
    return statistics.median(self.seconds[-last:] if last else self.seconds) if self.seconds else math.nan


def _truncated(packer) -> str:
  """The start-up line's count of examples cut to fit their rows (packed pairs)."""
  if packer is None:
    return ""
  cut = [f"{n:,} {side}" for n, side in ((packer.truncated_inputs, "inputs"), (packer.truncated_targets,
                                                                                 "targets")) if n]
  return f"; {' and '.join(cut)} truncated to fit" if cut else "; none truncated"


VAL_NAMES = {"perplexity": "ppl", "bits_per_byte": "bpb"}  # evaluation results -> metrics.jsonl keys


@dataclasses.dataclass(frozen=True)
class Policy:
  """When a step is logged, evaluated and saved: every N steps of each, and all three at the last."""

  steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def log(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.steps

  def evaluate(self, done: int) -> bool:
    return done % self.eval_every == 0 or done == self.steps

  def save(self, done: int, stopping: bool) -> bool:
    return done % self.checkpoint_every == 0 or done == self.steps or stopping


class Trainer:
  """One run's phases: restore-or-init, the step loop, evaluation, the checkpoint/stop policy, the end."""

  def __init__(self, config, workdir: str, corpus: Corpus, model_config: ModelConfig, token_bytes, mesh,
               progress: Progress, signals: StopSignals):
    self.config, self.workdir, self.corpus, self.model_config = config, workdir, corpus, model_config
    self.mesh, self.progress, self.signals = mesh, progress, signals
    self.log = MetricsLog(workdir, enabled=jax.process_index() == 0)
    self.timer, self.last, self.first_step, self.evaluations = StepTimer(), {}, None, 0
    c = config.train
    self.policy = Policy(c.steps, c.log_every, c.eval_every, c.checkpoint_every)
    self.objective = objectives.get(config.objective)
    self.batch_kwargs = dict(seq_len=self.objective.row_len(config.data), batch_size=config.data.batch_size,
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
    self.setup, self.init, self.shardings = plan_train_state(config, model_config, token_bytes, mesh)
    to_batch = self.objective.transform(corpus.tokenizer, config.seed, TRAIN_STREAM, config.data)
    self.packer = (self.objective.example_packer(*corpus.train_examples(), config.data, config.seed, TRAIN_STREAM)
                   if self.objective.packs_examples else None)  # (check_data: a pairs store)
    self.data = corpus.train_batches(workers=config.data.loader_workers, transform=to_batch, packer=self.packer,
                                     **self.batch_kwargs)
    self.checkpoints = Checkpoints(workdir, c.keep_checkpoints, c.keep_best)
    self.sharding = batch_sharding(mesh, tuple(config.mesh.rules))

  def run(self) -> dict[str, float]:
    try:
      state = self.restore_or_init()
      self.write_run_files()
      start, steps = int(state.step), self.config.train.steps
      if start >= steps:
        self.progress.message(f"{self.workdir} holds a finished run: step {start} of train.steps={steps} "
                              "(raise --config.train.steps to train on; `jaxlm sample` and `jaxlm eval` "
                              "use it as it is)")
        return {"finished_at": start}
      self.model_flops, self.peak = self.model_and_peak_flops()
      self.train, self.eval_step = compile_steps(self.setup, self.shardings, self.sharding)
      self.evaluator, self.val_rows = self.validation()
      self.watchdog = Watchdog(self.config.train.step_timeout, jax.process_count() > 1,
                               self.config.train.eval_batches)
      self.profiler = StepProfiler(profile_window(self.config), self.workdir, self.progress.message)
      self.log.open()
      try:
        state, stopped_at = self.steps(state)
      finally:
        self.profiler.stop(self.watchdog)  # (a trace still open: the run stopped or failed inside the window)
        self.watchdog.stop()
    finally:
      self.checkpoints.close()  # pending saves are committed, also when the run stops with an error
      self.log.close()
    return self.finish(state, stopped_at)

  def model_and_peak_flops(self) -> tuple[float, float]:
    """The model's training FLOPs per token (flops.py: 6N + attention) and a device's peak FLOP/s (0 when
    unknown), for MFU; says both in one line."""
    data, objective = self.config.data, self.objective
    target_len = objective.decoder_len(data) if objective.family == "encoder-decoder" else 0
    per_token = model_flops_per_token(self.model_config, objective.family, data.seq_len, target_len)
    peak, source = peak_flops_per_device(jax.devices()[0])
    about = f"peak {si(peak)}FLOP/s per device ({source})" if peak > 0 else f"no mfu: peak {source}"
    self.progress.message(f"model: {si(per_token)}FLOPs per token (6N + attention); {about}")
    return per_token, peak

  def validation(self) -> tuple[Evaluator, list]:
    """The evaluator of the loop (the objective's VAL stream) and its fixed validation rows."""
    kw = self.batch_kwargs
    corpus, data = self.corpus, self.config.data
    to_batch = self.objective.transform(corpus.tokenizer, kw["seed"], VAL_STREAM, data)
    first = first_row(kw["batch_size"], kw["process_index"], kw["process_count"])
    packer = (self.objective.example_packer(corpus.val_offsets, corpus.val_weights, data, kw["seed"], VAL_STREAM)
              if self.objective.packs_examples else None)
    rows = corpus.eval_batches(num_batches=self.config.train.eval_batches, packer=packer, **kw)
    return Evaluator(self.eval_step, to_batch, self.sharding, first), rows

  def restore_or_init(self):
    """The newest valid checkpoint of the workdir, or a fresh state (from init_from's parameters)."""
    abstract = abstract_like(jax.eval_shape(self.init), self.shardings)
    if restored := self.checkpoints.restore_latest(abstract, self.data):
      state, step = restored
      self.data.step = step  # (what the saved iterator state says, unless saved by another number of processes)
      self.log.drop_after(step)
      self.progress.message(f"resumed from {self.checkpoints.directory}/{step}")
      if self.config.init_from:
        self.progress.message(f"(init_from={self.config.init_from} applies to a fresh run only; resuming)")
      return state
    state = self.init()
    self.log.drop_after(0)  # (the lines of a run that died before its first checkpoint: logged again now)
    if self.config.init_from:
      params, _ = load_params(self.config.init_from, abstract_like(state.params, self.shardings.params))
      state = state.replace(params=params)
      self.progress.message(f"parameters from {self.config.init_from}")
    return state

  def write_run_files(self) -> None:
    if jax.process_index() == 0:
      files.write_text(files.join(self.workdir, "config.json"), to_json(self.config))
      save_tokenizer(self.corpus.tokenizer, files.join(self.workdir, "tokenizer.json"))
    shape, objective = self.mesh.shape, self.setup.objective
    about = objective.summary(self.config.data) + _truncated(self.packer)
    sft = (f" (loss on the {self.corpus.pairs[1]} tokens)" if self.corpus.pairs and self.packer is None
           else f" ({about})" if about else "")
    self.progress.message(
        f"{self.corpus.source}: {self.corpus.train_count:,} training / {len(self.corpus.val_tokens):,} "
        f"validation tokens; objective {objective.name}{sft}: {objective.family} of "
        f"{param_count(jax.eval_shape(self.init).params):,} parameters; mesh data={shape['data']} "
        f"fsdp={shape['fsdp']} tensor={shape['tensor']} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices")

  def steps(self, state):
    """Steps from the state's step to train.steps; returns (state, the step a stop signal ended at)."""
    previous = None  # metrics of the step dispatched before this one
    for step in range(int(state.step), self.policy.steps):
      done, policy = step + 1, self.policy
      self.profiler.before(done)
      self.last_batch = batch = to_global_batch(next(self.data), self.sharding)
      with jax.profiler.StepTraceAnnotation("train", step_num=done):  # (XProf's steps, when tracing)
        state, metrics = self.train(state, batch)
      for value in metrics.values():  # queued now, behind this step: the next step does not delay it
        value.copy_to_host_async()
      if previous is not None:
        # Keep one step in flight: wait for the previous one (on CPU meshes, an unbounded queue of
        # collectives can deadlock; on accelerators this still overlaps host work with the device).
        self.check_finite(step, jax.device_get(previous), logged=False)
      previous = metrics
      self.checkpoints.check()  # a save that failed in the background stops the run now
      if (first := self.timer.stepped()) is not None:
        self.first_step = first
        self.progress.message(f"first step compiled and dispatched in {first:.1f} s")
      self.watchdog.beat(f"step {done}", self.first_step, self.timer.median(50))
      profiled = self.profiler.after(done, (state, metrics), self.watchdog)
      if policy.log(done):
        self.log_step(done, metrics)
      if evaluated := policy.evaluate(done):
        self.watchdog.beat(f"the evaluation at step {done}", compiling=self.evaluations == 0)
        self.evaluations += 1
        self.evaluate_now(done, state.params)
      stop = stop_requested(self.signals, done)
      if saved := policy.save(done, stop):
        self.watchdog.beat(f"saving step {done}")
        self.save(done, state, metrics, evaluated)
      if evaluated or saved or profiled:
        self.timer.pause()
      if stop:
        return state, done
    return state, None

  def log_step(self, step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    sec = self.timer.median(self.config.train.log_every)
    values.update(self.throughput(sec))
    self.log.write(step, **values)
    self.last.update(values)
    self.progress.update(step, values["loss"], values["lr"], values["tokens_per_sec"], sec,
                         accuracy=values.get("accuracy"), mfu=values.get("mfu"))
    self.check_finite(step, values)

  def throughput(self, sec_per_step: float) -> dict[str, float]:
    """tokens_per_sec (over all devices), per device, and MFU: the model's FLOP/s per device over the
    peak (where it is known). Before any step is timed (the first compiles): 0 tokens/s and no MFU."""
    tokens = self.config.data.batch_size * self.config.data.seq_len / sec_per_step if sec_per_step > 0 else 0.0
    values = {"tokens_per_sec": tokens, "tokens_per_sec_per_device": tokens / jax.device_count()}
    if self.peak > 0 and tokens > 0:
      values["mfu"] = values["tokens_per_sec_per_device"] * self.model_flops / self.peak
    return values

  def evaluate_now(self, step: int, params) -> None:
    """val_loss: an estimate from the fixed train.eval_batches batches (`jaxlm eval` reads every token)."""
    result = self.evaluator.evaluate(params, self.val_rows)
    values = {f"val_{VAL_NAMES.get(k, k)}": v for k, v in result.items() if k != "tokens"}
    self.last.update(values)
    self.log.write(step, **values)
    if self.log.enabled:
      tokens_per_step = self.config.data.batch_size * self.config.data.seq_len
      title = files.split(self.workdir.rstrip("/"))[1]
      with storage_errors.writing("loss.png", self.workdir):
        plots.write_png(plots.run_figure(self.log.rows(), tokens_per_step, title), files.join(self.workdir, "loss.png"))
    shown = "  ".join(f"{k} {v:.4f}" if k != "val_ppl" else f"{k} {v:.2f}" for k, v in values.items())
    self.progress.message(f"step {step:>6d}  {shown}  (on {len(self.val_rows)} validation batches)")
    self.check_finite(step, values)

  def save(self, step: int, state, metrics, evaluated: bool) -> None:
    self.check_finite(step, jax.device_get(metrics), logged=False)
    jax.block_until_ready(state)  # (waiting for the step is training; the save starts after it)
    begin = time.monotonic()
    self.checkpoints.save(step, state, self.data, val_loss=self.last["val_loss"] if evaluated else None)
    self.timer.saves.append(time.monotonic() - begin)

  def check_finite(self, step: int, values: dict, logged: bool = True) -> None:
    """Stops the run at the first step whose loss, gradient norm or validation loss is not finite
    (with its line in metrics.jsonl, written now unless it was `logged`)."""
    bad = {k: float(values[k]) for k in ("loss", "grad_norm", "val_loss")
           if k in values and not math.isfinite(float(values[k]))}
    if not bad:
      return
    if not logged:
      self.log.write(step, **values)
    self.checkpoints.wait()
    saved = [s for s in self.checkpoints.steps() if s < step]
    resume = (f"rerunning resumes from the checkpoint of step {saved[-1]}" if saved
              else "no checkpoint was saved; rerunning starts over")
    found = ", ".join(f"{k} {v}" for k, v in bad.items())
    raise RunFailed(f"training diverged at step {step}: {found}; nothing non-finite was saved",
                    f"lower --config.optim.lr (now {self.config.optim.lr:g}), lengthen optim.warmup_steps "
                    f"or keep optim.clip_norm on; {resume}")

  def finish(self, state, stopped_at: int | None) -> dict[str, float]:
    last, timer, b, t = self.last, self.timer, self.config.data.batch_size, self.config.data.seq_len
    last["loop_seconds"] = time.monotonic() - timer.started  # after the first step, saves included
    last["model_flops_per_token"] = self.model_flops
    if timer.seconds:
      sec = last["step_seconds"] = timer.median()
      if not self.model_config.scan_layers:  # (XLA counts a scanned stack's loop body once)
        last["flops_per_token"] = flops_per_token(self.eval_step, state.params, self.last_batch)
      median = self.throughput(sec)
      mfu = f" (MFU {median['mfu']:.1%})" if "mfu" in median else ""
      self.progress.message(f"median step {sec * 1e3:.1f} ms, {b * t / sec:,.0f} tokens/s, "
                            f"{self.model_flops * b * t / sec / 1e9:.1f} model GFLOP/s{mfu}")
    if len(timer.saves) > 1:  # the first save also sets orbax up
      last["save_seconds"] = statistics.median(timer.saves[1:])
    if stopped_at is not None:
      last["stopped_at"] = stopped_at
      by = self.signals.received or "a signal to another process"
      self.progress.message(f"stopped by {by} after step {stopped_at}; checkpoint saved; run the same "
                            "command again to resume")
    elif self.config.train.sample_tokens:
      self.progress.message("sample:\n" + end_sample(self.config, self.corpus, self.setup, state.params,
                                                     self.model_config, self.mesh))
    return last
