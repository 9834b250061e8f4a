"""`jaxlm import --from=HF_DIR --workdir=W`: a local Hugging Face GPT-2 or Llama folder as a jaxlm workdir.

W gets config.json (objective clm and the model settings config.json implies), the folder's tokenizer.json
byte for byte, `imported.json` (where it came from) and checkpoint step 0 holding the parameters only, in
float32 (a bf16 or fp16 checkpoint converts exactly). `jaxlm sample`, `jaxlm eval --data=...`, the API and
`jaxlm train --config.init_from=W` (fine-tuning, in a new workdir) read it; training in W itself is refused,
as it holds no optimizer state and no data of its own.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import files, objectives
from jaxlm.checkpoint import Checkpoints, path_name
from jaxlm.config import base_config, to_json
from jaxlm.data.tokenizer import load_tokenizer_json
from jaxlm.errors import UserError
from jaxlm.interop import convert, hf_config, safetensors
from jaxlm.workdir import Workdir

MARKER = "imported.json"
DEFAULT_SEQ_LEN = 1024  # data.seq_len of an imported run (its eval windows), or the positions if fewer


def imported(workdir: str) -> dict | None:
  """What `imported.json` says about a workdir made by `jaxlm import`, or None for a trained one."""
  path = files.join(workdir, MARKER)
  if not files.isfile(path):
    return None
  try:
    return json.loads(files.read_text(path))
  except (ValueError, UnicodeDecodeError):
    raise UserError(f"{path} is not valid JSON", "import the model again into a new workdir") from None


def read_hf_config(folder: str) -> dict:
  if not files.isdir(folder):
    what = "is a file, not a folder" if files.exists(folder) else "does not exist"
    raise UserError(f"{folder} {what}", "give --from=the folder of a Hugging Face checkpoint")
  path = files.join(folder, "config.json")
  if not files.isfile(path):
    raise UserError(f"{folder} has no config.json, so it is not a Hugging Face model folder",
                    "give the folder save_pretrained wrote (config.json, *.safetensors, tokenizer.json)")
  try:
    hf = json.loads(files.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e})", "the folder is damaged; download it again") from None
  if not isinstance(hf, dict):
    raise UserError(f"{path} is not a JSON object", "the folder is damaged; download it again")
  return hf


def read_tokenizer(folder: str, vocab_size: int):
  """(tokenizer.json's bytes, the tokenizer), checked against the model's vocabulary."""
  path = files.join(folder, "tokenizer.json")
  if not files.isfile(path):
    legacy = [n for n in ("vocab.json", "merges.txt", "tokenizer.model") if files.isfile(files.join(folder, n))]
    raise UserError(f"{folder} has no tokenizer.json" + (f" (only {', '.join(legacy)})" if legacy else ""),
                    "write one with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
  raw = files.read_bytes(path)
  try:
    tokenizer = load_tokenizer_json(raw.decode("utf-8"), path)
  except UnicodeDecodeError:
    raise UserError(f"{path} is not UTF-8 text", "give the tokenizer.json that came with these weights") from None
  if tokenizer.vocab_size > vocab_size:
    raise UserError(f"{path} has {tokenizer.vocab_size:,} token ids, more than the model's vocabulary of "
                    f"{vocab_size:,}", "give the tokenizer.json that came with these weights")
  return raw, tokenizer


def imported_config(settings: dict, scan_layers: bool):
  """The run config of an imported model: objective clm, the model settings, the rest at their defaults."""
  config = base_config()
  for key, value in settings.items():
    config.model[key] = value
  config.model.scan_layers = scan_layers
  config.data.seq_len = min(DEFAULT_SEQ_LEN, settings["max_seq_len"])
  config.data.batch_size = 8
  return config


def import_folder(source: str, workdir: str, *, scan_layers: bool = False) -> dict:
  """Converts the Hugging Face folder `source` into the new workdir `workdir`; returns what was done."""
  start = time.perf_counter()
  hf = read_hf_config(source)
  where = files.join(source, "config.json")
  family, settings = hf_config.family_of(hf, where), hf_config.model_settings(hf, where)
  tokenizer_json, tokenizer = read_tokenizer(source, settings["vocab_size"])
  config = imported_config(settings, scan_layers)
  from jaxlm.loop import checked, model_for

  config = checked(config, jax.device_count())[0]
  model_config, _ = model_for(config, tokenizer)
  if files.exists(workdir) and files.listdir(workdir):
    raise UserError(f"workdir {workdir} already exists and is not empty", "import into a new --workdir")
  tensors = safetensors.read_folder(source)
  dtypes = sorted({str(x.dtype) for x in tensors.values()})
  ours = convert.to_ours(tensors, family, model_config, source)
  if scan_layers:
    ours = convert.stacked(ours, model_config.num_layers)
  params = _as_params(ours, model_config)
  about = {"from": files.absolute(source), "family": family, "dtypes": dtypes, "hf_config": hf}
  with Workdir(workdir) as hold:
    hold.lock()
    try:
      _write(workdir, config, tokenizer_json, params, about)
    except BaseException:
      if not hold.existed and jax.process_index() == 0:
        hold.release()
        files.remove_tree(workdir)  # (a workdir half written is no workdir: nothing of it is kept)
      raise
  return {"family": family, "parameters": int(sum(x.size for x in ours.values())), "dtypes": dtypes,
          "seconds": time.perf_counter() - start, "config": config}


def _as_params(ours: dict[str, np.ndarray], model_config):
  """The model's parameter state (nnx.State of jax arrays) with the converted values in place."""
  model = lambda: objectives.get("clm").model(model_config, nnx.Rngs(params=0))
  abstract = nnx.split(nnx.eval_shape(model))[1]

  def value(path, leaf):
    array = ours[path_name(path)]
    assert array.shape == leaf.shape, (path_name(path), array.shape, leaf.shape)  # (convert checked them)
    return jnp.asarray(array, jnp.float32)

  return jax.tree_util.tree_map_with_path(value, abstract)


class _NoData:
  """An imported model has no data iterator: its checkpoint's data item is empty."""

  def get_state(self) -> bytes:
    return b"{}"


def _write(workdir: str, config, tokenizer_json: bytes, params, about: dict) -> None:
  """The checkpoint first, then the files that make the folder a workdir (config.json last)."""
  checkpoints = Checkpoints(workdir, keep=1, keep_best=False)
  try:
    checkpoints.save(0, {"params": params}, _NoData())
    checkpoints.wait()
  finally:
    checkpoints.close()
  if jax.process_index() == 0:
    files.write_bytes(files.join(workdir, "tokenizer.json"), tokenizer_json)
    files.write_text(files.join(workdir, MARKER), json.dumps(about, indent=2) + "\n")
    files.write_text(files.join(workdir, "config.json"), to_json(config))
