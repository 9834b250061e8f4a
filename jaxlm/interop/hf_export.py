"""`jaxlm export --workdir=W --to=DIR [--step=N] [--dtype=float32|bfloat16]`: a decoder run as a Hugging Face
folder that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the same logits.

DIR gets config.json (GPT2LMHeadModel or LlamaForCausalLM, whichever the model's settings are exactly),
model.safetensors, generation_config.json and the tokenizer: the run's own tokenizer.json byte for byte (a
BPE run, or an import), or for a byte-level run an equivalent one (each byte its own token, the four special
tokens after them), with a tokenizer_config.json that names the special tokens.
"""

import json
import time

import jax
import ml_dtypes
import numpy as np

from jaxlm import files, storage_errors
from jaxlm.checkpoint import path_name
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.errors import UserError
from jaxlm.interop import convert, hf_config, safetensors
from jaxlm.interop.byte_tokenizer import byte_tokenizer_json

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def params_by_name(params) -> dict[str, np.ndarray]:
  """A run's parameters (nnx.State, sharded or not) as host numpy arrays by name."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_name(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def export_run(run, target: str, dtype: str = "float32") -> dict:
  """Writes the loaded run (`jaxlm.load(...)`) into the new folder `target`; returns what was done."""
  start = time.perf_counter()
  if run.objective.family != "decoder":
    raise UserError(f"{run.workdir} is {'an' if run.objective.family[0] in 'ae' else 'a'} {run.objective.family} "
                    f"(objective {run.objective.name}); jaxlm exports decoders (objective clm) to Hugging Face",
                    "export a causal LM run")
  m = run.model_config
  family = hf_config.export_family(m)
  if files.exists(target) and (not files.isdir(target) or files.listdir(target)):
    raise UserError(f"--to {target} already exists and is not an empty folder", "export into a new folder")
  ours = convert.unstacked(params_by_name(run.params), m.num_layers)  # (a scanned stack's layers one by one)
  tensors = convert.to_theirs(ours, family, m, DTYPES[dtype])
  tok = run.tokenizer
  config = {**hf_config.hf_config(m, family, tok.BOS, tok.EOS), "dtype": dtype, "torch_dtype": dtype}  # (5.x, 4.x)
  existed = files.exists(target)
  try:
    with storage_errors.writing("the exported model", target, again="export again",
                                elsewhere="give a --to on a writable filesystem"):
      files.makedirs(target)
      safetensors.write_file(files.join(target, safetensors.SINGLE), tensors, {"format": "pt"})
      _write_tokenizer(run, target)
      generation = {"bos_token_id": tok.BOS, "eos_token_id": tok.EOS, "pad_token_id": tok.PAD}
      files.write_text(files.join(target, "generation_config.json"), json.dumps(generation, indent=2) + "\n")
      files.write_text(files.join(target, "config.json"), json.dumps(config, indent=2) + "\n")  # (last: complete)
  except BaseException:
    if not existed and files.isdir(target):
      files.remove_tree(target)  # (a half-written export is no model, and would refuse the next export)
    raise
  return {"family": family, "step": run.step, "tensors": len(tensors), "dtype": dtype,
          "bytes": int(sum(x.nbytes for x in tensors.values())), "seconds": time.perf_counter() - start}


def _write_tokenizer(run, target: str) -> None:
  tok = run.tokenizer
  if isinstance(tok, ByteTokenizer):
    text = byte_tokenizer_json().encode()
  else:
    text = files.read_bytes(files.join(run.workdir, "tokenizer.json"))
  files.write_bytes(files.join(target, "tokenizer.json"), text)
  names = {tok.BOS: None, tok.EOS: None, tok.PAD: None}
  spec = json.loads(text)
  for added in spec.get("added_tokens") or []:
    if added.get("id") in names:
      names[added["id"]] = added.get("content")
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": run.model_config.max_seq_len,
            "bos_token": names[tok.BOS], "eos_token": names[tok.EOS], "pad_token": names[tok.PAD],
            "clean_up_tokenization_spaces": False}
  files.write_text(files.join(target, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
