"""Scan over layers, rematerialisation, grouped-query attention and the attention implementations change
no number: each is compared with today's unrolled, non-rematerialised, multi-head einsum model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import objectives
from jaxlm.data.text import train_batch
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.generate import Generator, Sampling
from jaxlm.models.decoder import GPT
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives.base import TRAIN_STREAM
from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
from jaxlm.train import compile_steps, create_train_state
from test_parallel import _pair_rows, mesh_test_config

TOKENS = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
STACKS = ("blocks", "encoder", "decoder")


def run_steps(config, shape=(2, 1, 1), steps=3):
  """(per-step (loss, grad_norm), parameters, the compiled train step) of `steps` steps on a mesh."""
  mesh = make_mesh(shape, jax.devices()[: int(np.prod(shape))])
  objective = objectives.get(config.objective)
  to_batch = objective.transform(ByteTokenizer(), config.seed, TRAIN_STREAM, config.data)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.rules)):
    setup, state, shardings = create_train_state(config, ModelConfig.from_config(config.model, 384), np.ones(384),
                                                 mesh)
    sharding = batch_sharding(mesh, tuple(config.mesh.rules))
    train, _ = compile_steps(setup, shardings, sharding)
    history = []
    for step in range(steps):
      rows = (_pair_rows(config, step) if config.objective == "seq2seq" else
              train_batch(TOKENS, step, seq_len=objective.row_len(config.data), batch_size=config.data.batch_size,
                          seed=0))
      state, metrics = train(state, to_global_batch(to_batch(rows, step, 0), sharding))
      history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return history, jax.device_get(nnx.to_pure_dict(state.params)), (train, state, sharding)


def stacked(params: dict) -> dict:
  """An unrolled model's parameters in the scanned layout: each stack's blocks 0..L-1 stacked."""
  out = dict(params)
  for name in STACKS:
    if name in params:
      layers = [params[name][i] for i in sorted(params[name])]
      out[name] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return out


def config_for(objective, **model):
  c = mesh_test_config(objective)  # (its Adam eps: Adam's conditioning, not the layout, would set the bound)
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


@pytest.fixture(scope="module")
def unrolled():
  runs = {}

  def get(objective):
    if objective not in runs:
      runs[objective] = run_steps(config_for(objective))
    return runs[objective]
  return get


def assert_same(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# A scan is the same arithmetic inside a loop; XLA fuses the loop body on its own, so sums may be
# reordered: float32 rounding, ~1e-7 relative, bounds losses and gradient norms; parameters after 3 Adam
# steps (lr 1e-3) differ by a few 1e-7 at most.
@pytest.mark.parametrize("objective", ["clm", "mlm", "seq2seq"])
def test_scanned_and_unrolled_stacks_give_the_same_losses_gradients_and_parameters(unrolled, objective):
  ref_history, ref_params, _ = unrolled(objective)
  history, params, (_, state, _) = run_steps(config_for(objective, scan_layers=True), shape=(1, 2, 2))
  np.testing.assert_allclose(history, ref_history, rtol=2e-6)
  assert_same(params, stacked(ref_params), rtol=0, atol=1e-6)
  name = "decoder" if objective == "seq2seq" else "blocks"
  up = state.params[name]["mlp"]["up"]
  assert up.shape == (2, 64, 128)  # (layers, embed, mlp): one stacked array, sharded over fsdp and tensor
  assert up[...].addressable_shards[0].data.shape == (2, 32, 64)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_projections"])
def test_remat_changes_no_number(unrolled, policy):
  ref_history, ref_params, _ = unrolled("clm")
  history, params, _ = run_steps(config_for("clm", remat=policy))
  # Recomputation repeats the same operations on the same inputs: XLA may fuse them differently.
  np.testing.assert_allclose(history, ref_history, rtol=2e-6)
  assert_same(params, ref_params, rtol=0, atol=1e-6)


def temp_bytes(**model) -> int:
  """The compiled train step's temporary bytes for a config where activations dominate: a long
  sequence against few parameters.

  Scanned: XLA CPU expands the optimization barriers that keep an unrolled block's recomputation apart
  from its forward pass before it eliminates common subexpressions (measured: the compiled HLO has no
  opt-barrier left, and the bytes are the same with and without remat), so on CPU remat saves memory in
  a scanned stack only; GPU and TPU compilers keep the barriers."""
  c = config_for("clm", scan_layers=True, **model)
  c.data.seq_len, c.model.max_seq_len, c.data.batch_size, c.model.num_layers = 256, 256, 8, 4
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(c.mesh.rules)):
    from jaxlm.train import plan_train_state

    setup, init, shardings = plan_train_state(c, ModelConfig.from_config(c.model, 384), np.ones(384), mesh)
    sharding = batch_sharding(mesh, tuple(c.mesh.rules))
    train, _ = compile_steps(setup, shardings, sharding)
    batch = {"inputs": jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=sharding),
             "targets": jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=sharding)}
    return train.lower(jax.eval_shape(init), batch).compile().memory_analysis().temp_size_in_bytes


def test_remat_lowers_the_compiled_steps_temporary_bytes():
  none, full, projections = temp_bytes(), temp_bytes(remat="full"), temp_bytes(remat="save_projections")
  assert full < 0.5 * none, (none, full)  # (measured: 2 layers 88.8 -> 39.4 MB, 8 layers 260 -> 43 MB)
  assert full <= projections < none, (none, projections, full)


def gqa_and_mha(kv_heads: int):
  """A grouped-query model and the multi-head model that repeats each of its key/value heads for the
  query heads it serves: the same function."""
  base = dict(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=64)
  gqa = GPT(ModelConfig(**base, num_kv_heads=kv_heads), rngs=nnx.Rngs(params=0))
  mha = GPT(ModelConfig(**base), rngs=nnx.Rngs(params=1))
  for g, m in zip(gqa.blocks, mha.blocks):
    kv_DxCxGxK = g.attn.kv[...]
    kv_DxCxHxK = jnp.repeat(kv_DxCxGxK, 4 // kv_heads, axis=2)  # head h uses key/value head h // (H/G)
    m.attn.qkv[...] = jnp.concatenate([g.attn.q[...][:, None], kv_DxCxHxK], axis=1)
    for name in ("out",):
      getattr(m.attn, name)[...] = getattr(g.attn, name)[...]
    for part in ("attn_norm", "mlp_norm"):
      getattr(m, part).scale[...] = getattr(g, part).scale[...]
    m.mlp.up[...], m.mlp.down[...] = g.mlp.up[...], g.mlp.down[...]
  mha.embed[...] = gqa.embed[...]
  return gqa, mha


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(kv_heads):
  gqa, mha = gqa_and_mha(kv_heads)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
  assert gqa.blocks[0].attn.kv.shape == (64, 2, kv_heads, 16)
  # Different einsums (grouped or not) of the same products: float32 rounding only.
  np.testing.assert_allclose(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_num_kv_heads_equal_to_num_heads_is_todays_attention_exactly():
  base = dict(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=64)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
  today, same = GPT(ModelConfig(**base), rngs=nnx.Rngs(params=0)), GPT(ModelConfig(**base, num_kv_heads=4),
                                                                       rngs=nnx.Rngs(params=0))
  assert jax.tree.map(jnp.shape, nnx.state(today)) == jax.tree.map(jnp.shape, nnx.state(same))
  np.testing.assert_array_equal(today(tokens), same(tokens))


@pytest.mark.parametrize("variant", [{"attention": "dot_product"}, {"attention": "dot_product", "num_kv_heads": 2}])
def test_jax_dot_product_attention_gives_the_einsum_numbers(variant):
  base = dict(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=64,
              num_kv_heads=variant.get("num_kv_heads", 0))
  einsum, fused = (GPT(ModelConfig(**base, attention=a), rngs=nnx.Rngs(params=0))
                   for a in ("einsum", variant["attention"]))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 32)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1, 2, 3, 0]], 8, axis=1).repeat(2, 0), jnp.int32)  # 3 documents, padding
  # The same products in another order (XLA's softmax, its einsums): float32 rounding only.
  np.testing.assert_allclose(fused(tokens), einsum(tokens), rtol=1e-5, atol=1e-5)
  real = np.asarray(segments) != 0
  np.testing.assert_allclose(np.asarray(fused(tokens, segment_ids_BxT=segments))[real],
                             np.asarray(einsum(tokens, segment_ids_BxT=segments))[real], rtol=1e-5, atol=1e-5)


def test_a_scanned_model_samples_the_unrolled_models_text():
  base = dict(vocab_size=384, num_layers=3, num_heads=4, width=64, mlp_width=128, max_seq_len=64, num_kv_heads=2)
  text = []
  for scan in (False, True):
    cfg = ModelConfig(**base, scan_layers=scan)
    model = GPT(cfg, rngs=nnx.Rngs(params=0))
    model.embed[...] = model.embed[...] * 20  # confident logits: no near-ties for float noise to flip
    graphdef, params = nnx.split(model)
    gen = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=260)
    prompts = [np.arange(5, dtype=np.int32), np.arange(9, dtype=np.int32) + 40]
    text.append(gen.generate(prompts, max_new_tokens=20, sampling=Sampling(temperature=2.0, top_k=40), seed=3))
  for a, b in zip(*text):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_one_layout_is_refused_by_the_other_with_the_setting_to_use(trained_run, tmp_path, capsys):
  """trained_run's checkpoints hold an unrolled stack: resuming it scanned, or starting a scanned run
  from its parameters, is one line that names the setting."""
  import shutil

  from jaxlm import cli

  workdir = tmp_path / "copy"
  shutil.copytree(trained_run.workdir, workdir)
  config = f"--config={os.path.dirname(__file__)}/tiny.py"
  for args, fragment in (
      ([f"--workdir={workdir}", "--config.train.steps=9"],
       f"{workdir} was trained with model.scan_layers=False; this run asks for True"),
      ([f"--workdir={tmp_path / 'new'}", f"--config.init_from={trained_run.workdir}"],
       "holds an unrolled stack of layers; this run asks for a scanned one (give "
       "--config.model.scan_layers=False to read it)")):
    code = cli.main(["train", config, "--config.mesh.data=-1", "--config.model.scan_layers=true", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
