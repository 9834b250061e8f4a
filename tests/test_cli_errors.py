"""Every user mistake: one line `jaxlm: error: ...` with a hint, exit code 2, no traceback."""

import json
import os

import pytest

from conftest import tiny_config

from jaxlm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def run_cli(capsys, *args):
  code = cli.main(list(args))
  err = capsys.readouterr().err
  return code, err


def train(capsys, tmp_path, *overrides, workdir=None, config=DEFAULT):
  return run_cli(capsys, "train", f"--config={config}", f"--workdir={workdir or tmp_path / 'w'}",
                 "--config.train.steps=3", "--config.optim.warmup_steps=1", *overrides)


def assert_one_line_error(code, err, *fragments):
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxlm: error: "), err
  assert "(" in lines[0] and lines[0].endswith(")"), "the message carries a hint in parentheses"
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_unknown_config_key(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, "--config.model.widht=64"), "unknown config key model.widht")


def test_width_not_divisible_by_heads(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, "--config.model.width=100", "--config.model.num_heads=3"),
                        "model.width 100 is not divisible by model.num_heads 3")


def test_mesh_size_not_equal_to_device_count(capsys, tmp_path):
  # the tests run on 8 simulated devices
  assert_one_line_error(*train(capsys, tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=2"),
                        "2x2x1 = 4 devices, but there are 8")


def test_global_batch_not_divisible_by_data_parallel_size(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, "--config.data.batch_size=12"),
                        "data.batch_size=12 is not divisible by the data-parallel size", "= 8")


def test_sequence_longer_than_positions(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, "--config.data.seq_len=512"),
                        "data.seq_len 512 is longer than model.max_seq_len 128")


def test_data_file_missing(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, f"--config.data.path={tmp_path}/nope.txt"),
                        "nope.txt does not exist")


def test_data_file_empty(capsys, tmp_path):
  (tmp_path / "empty.txt").write_text("  \n")
  assert_one_line_error(*train(capsys, tmp_path, f"--config.data.path={tmp_path}/empty.txt"),
                        "empty.txt is empty")


def test_data_shorter_than_one_sequence(capsys, tmp_path):
  (tmp_path / "short.txt").write_text("a few words of text, but not many " * 20)
  assert_one_line_error(*train(capsys, tmp_path, f"--config.data.path={tmp_path}/short.txt"),
                        "short.txt is too short", "fewer than one sequence")


def test_workdir_not_writable(capsys, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("a file where the workdir's parent should be")
  assert_one_line_error(*train(capsys, tmp_path, workdir=blocker / "run"), "is not writable")


def test_bad_value_type(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, "--config.data.batch_size=lots"),
                        "--config.data.batch_size=lots")


def test_unknown_flag(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, "--bogus=1"), "unknown flag --bogus")


def test_missing_config_file(capsys, tmp_path):
  assert_one_line_error(*train(capsys, tmp_path, config=tmp_path / "none.py"), "none.py does not exist")
  assert_one_line_error(*train(capsys, tmp_path, config="missing.py"), "config file missing.py does not exist")


def write_config(tmp_path, body):
  path = tmp_path / "exp.py"
  path.write_text("from jaxlm.config import base_config\n\n\n" + body)
  return path


@pytest.mark.parametrize("body, fragment", [
    ("def get_config(:\n  pass\n", "exp.py:4: syntax error: invalid syntax"),
    ("def get_config():\n  c = base_config()\n  raise ValueError('set the width first')\n",
     "exp.py:6: get_config() raised ValueError: set the width first"),
    ("import nonexistent_module\n", "exp.py:4: running it raised ModuleNotFoundError: No module named"),
    ("def get_config():\n  c = base_config()\n  c.model.widht = 64\n  return c\n",
     "exp.py sets model.widht, which is not a config key"),
    ("def get_config():\n  c = base_config()\n  c.train.steps = 'many'\n  return c\n",
     "exp.py:6: get_config() raised TypeError"),
    ("def get_config():\n  return {'model': {}}\n", "get_config() in"),
    ("CONFIG = 1\n", "has no get_config() function"),
])
def test_a_broken_config_file_is_one_line_naming_file_and_line(capsys, tmp_path, body, fragment):
  assert_one_line_error(*train(capsys, tmp_path, config=write_config(tmp_path, body)), fragment)


@pytest.mark.parametrize("override, fragment", [
    ("--config.model.widht=64", "unknown config key model.widht (see `jaxlm train --help` for the keys; did "
     "you mean model.width?)"),
    ("--config.train.steps=3.5", "--config.train.steps=3.5: train.steps takes an integer"),
    ("--config.model.tie_embeddings=maybe", "model.tie_embeddings takes true or false"),
    ("--config.optim.lr=fast", "optim.lr takes a number"),
    ("--config.mesh.rules=((", "mesh.rules takes a Python tuple literal"),
    ("--config.model=3", "--config.model names a section, not a key"),
    ("--config.model.width", "--config.model.width has no value"),
])
def test_bad_overrides(capsys, tmp_path, override, fragment):
  assert_one_line_error(*train(capsys, tmp_path, override), fragment)


def test_an_integer_written_as_a_float_is_accepted():
  from jaxlm.configfile import apply_overrides

  config = apply_overrides(tiny_config(), [("train.steps", "1e4"), ("model.use_bias", "True")])
  assert config.train.steps == 10000 and config.model.use_bias is True


def test_missing_workdir(capsys):
  assert_one_line_error(*run_cli(capsys, "train", f"--config={DEFAULT}"), "missing --workdir")


def test_unknown_command(capsys):
  assert_one_line_error(*run_cli(capsys, "trian"), "unknown command 'trian'")


@pytest.mark.parametrize("override, fragment", [
    ("--config.model.dtype=float16", "model.dtype is 'float16'"),
    ("--config.train.steps=0", "train.steps must be positive"),
    ("--config.data.val_fraction=1.5", "data.val_fraction must be in (0, 1)"),
    ("--config.model.dropout=1.0", "model.dropout must be in [0, 1)"),
    ("--config.data.loader_workers=-1", "data.loader_workers must be 0 or more"),
    ("--config.model.vocab_size=128", "model.vocab_size 128 is smaller than the tokenizer's 260"),
    # Numeric keys out of their domain (each trained or crashed before):
    ("--config.optim.lr=0", "optim.lr must be positive, got 0.0"),
    ("--config.optim.lr=-1e-3", "optim.lr must be positive"),
    ("--config.optim.lr=nan", "optim.lr must be positive, got nan"),
    ("--config.optim.lr=inf", "optim.lr must be positive, got inf"),
    ("--config.optim.final_lr=0.1", "optim.final_lr 0.1 is above the peak optim.lr 0.002"),
    ("--config.optim.b1=1.0", "optim.b1 must be in [0, 1), got 1.0"),
    ("--config.optim.b2=-0.5", "optim.b2 must be in [0, 1)"),
    ("--config.optim.eps=0", "optim.eps must be positive"),
    ("--config.optim.clip_norm=-1", "optim.clip_norm must be 0 or more"),
    ("--config.optim.weight_decay=nan", "optim.weight_decay must be 0 or more, got nan"),
    ("--config.optim.warmup_steps=-1", "optim.warmup_steps must be 0 or more"),
    ("--config.model.rope_base=0", "model.rope_base must be positive"),
    ("--config.seed=-1", "seed must be 0 or more"),
    ("--config.train.sample_tokens=-5", "train.sample_tokens must be 0 or more"),
    ("--config.mesh.cpu_devices=-2", "mesh.cpu_devices must be 0 or more"),
    ("--config.train.step_timeout=-2", "train.step_timeout must be at least -1, got -2.0"),
    ("--config.train.step_timeout=nan", "train.step_timeout must be at least -1, got nan"),
    ("--config.mesh.rules=(('embed','pipeline'),)", "mesh.rules has the entry ('embed', 'pipeline')"),
    ("--config.train.sample_prompt=\udcff", "train.sample_prompt is not valid UTF-8 (byte 0xff at position 0)"),
])


def test_other_bad_values(capsys, tmp_path, override, fragment):
  assert_one_line_error(*train(capsys, tmp_path, override), fragment)


@pytest.mark.parametrize("overrides, fragment", [
    (("--config.model.width=132", "--config.model.num_heads=4"), "RoPE needs an even head width, got 33"),
    (("--config.mesh.data=4", "--config.mesh.tensor=2", "--config.model.vocab_size=301"),
     "the vocabulary of 301 is not divisible by mesh.tensor 2"),
    (("--config.mesh.data=1", "--config.mesh.tensor=8"), "model.num_heads 4 is not divisible by mesh.tensor 8"),
    (("--config.model.width=132", "--config.model.position=learned", "--config.mesh.data=1",
      "--config.mesh.fsdp=8"), "model.width 132 is not divisible by mesh.fsdp 8"),
    (("--config.model.num_heads=8", "--config.model.num_kv_heads=3"),
     "model.num_kv_heads 3 does not divide model.num_heads 8"),
    (("--config.model.num_heads=8", "--config.model.num_kv_heads=2", "--config.mesh.data=2", "--config.mesh.tensor=4"),
     "model.num_kv_heads 2 is not divisible by mesh.tensor 4"),
    (("--config.model.attention=cudnn",), "model.attention=cudnn runs on an NVIDIA GPU; this machine's JAX backend is cpu"),
    (("--config.model.attention=splash",), "model.attention=splash runs on a TPU"),
    (("--config.model.remat=some",), "model.remat"),
])
def test_shapes_the_mesh_cannot_split(capsys, tmp_path, overrides, fragment):
  assert_one_line_error(*train(capsys, tmp_path, *overrides), fragment)


def test_cpu_devices_after_jax_started_is_a_clear_error(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS")  # JAX has long started in this test process
  with pytest.raises(cli.UserError, match="mesh.cpu_devices=2 cannot be applied: JAX has already started"):
    cli._set_cpu_devices(2)


def test_prepare_output_under_a_regular_file(capsys, tmp_path):
  (tmp_path / "doc.txt").write_text("some text to tokenize " * 10)
  (tmp_path / "notes").write_text("a file, not a folder")
  assert_one_line_error(*run_cli(capsys, "prepare", f"--input={tmp_path / 'doc.txt'}",
                                 f"--output={tmp_path / 'notes' / 'store'}"), "which is a file")


def test_sample_prompt_that_is_not_utf8(capsys, tmp_path):
  # Python hands undecodable argv bytes over as lone surrogates (PEP 383): b"ab\xff" -> "ab\udcff".
  assert_one_line_error(*run_cli(capsys, "sample", f"--workdir={tmp_path}", "--prompt=ab\udcff"),
                        "--prompt is not valid UTF-8 (byte 0xff at position 2)")


@pytest.mark.parametrize("name, content, fragment", [
    ("program", bytes(range(256)) * 40, "is not UTF-8 text: 40 NUL bytes and"),  # an executable, say
    ("utf16.txt", "text saved as UTF-16 ".encode("utf-16") * 50, "is not UTF-8 text"),
    ("docs.jsonl", b'{"text": "a document"}\n' * 100, "docs.jsonl is JSONL, not plain text"),
    ("corpus.txt.gz", b"\x1f\x8b" + b"x" * 2000, "corpus.txt.gz is compressed, not plain text"),
])
def test_data_that_is_not_plain_text_is_refused(capsys, tmp_path, name, content, fragment):
  (tmp_path / name).write_bytes(content)
  assert_one_line_error(*train(capsys, tmp_path, f"--config.data.path={tmp_path / name}"), fragment)
  assert not (tmp_path / "w").exists()  # the data is checked before the workdir is made


def test_a_few_invalid_bytes_are_replaced_and_counted(tmp_path, capsys):
  from jaxlm.data.text import read_text

  # Latin-1 text: one byte of an accented letter per sentence is not UTF-8.
  (tmp_path / "latin1.txt").write_bytes("The caf\u00e9 on the corner serves tea and cake. ".encode("latin-1") * 20)
  text = read_text(str(tmp_path / "latin1.txt"))
  assert text.count("\ufffd") == 20
  assert capsys.readouterr().err == (f"jaxlm: warning: data file {tmp_path / 'latin1.txt'}: 20 invalid UTF-8 "
                                     "sequences replaced by U+FFFD (`jaxlm prepare --strict_utf8` finds them)\n")


def test_a_broken_workdir_config_is_one_line(capsys, tmp_path):
  (tmp_path / "config.json").write_text('{"model": {"width": ')
  assert_one_line_error(*run_cli(capsys, "sample", f"--workdir={tmp_path}"), "config.json is not valid JSON")
  (tmp_path / "config.json").write_text(json.dumps({"model": {"widht": 64}}))
  assert_one_line_error(*run_cli(capsys, "eval", f"--workdir={tmp_path}"),
                        "has the key 'model.widht', which this jaxlm does not know")
  (tmp_path / "config.json").write_text(json.dumps({"model": {"width": "wide"}}))
  assert_one_line_error(*run_cli(capsys, "eval", f"--workdir={tmp_path}"), "model.width is 'wide', not a int")


@pytest.mark.parametrize("args, fragment", [
    (("train", "--workdir=w"), "missing --config"),
    (("train", f"--config={DEFAULT}", "--workdir"), "--workdir needs a value"),
    (("train", f"--config={DEFAULT}", "--workdir=w", "extra"), "unexpected argument 'extra'"),
    (("train", f"--config={ROOT}/configs", "--workdir=w"), "configs is a folder"),
])
def test_malformed_train_command_lines(capsys, args, fragment):
  assert_one_line_error(*run_cli(capsys, *args), fragment)


def test_a_bad_heartbeat_setting_is_a_clear_error(monkeypatch):
  from jaxlm import peers

  monkeypatch.setenv("JAXLM_HEARTBEAT_SECONDS", "soon")
  with pytest.raises(cli.UserError, match="JAXLM_HEARTBEAT_SECONDS='soon' is not a whole number"):
    peers.heartbeat_seconds()
