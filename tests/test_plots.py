"""WORKDIR/loss.png after each evaluation, and `jaxlm plot` overlaying runs."""

import json
import shutil

import pytest

from jaxlm import cli, plots
from jaxlm.metrics import parse_rows

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == PNG
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_run_keeps_a_loss_png_with_training_validation_and_the_learning_rate(trained_run):
  assert _png_size(trained_run.workdir / "loss.png") == (700, 400)
  rows = parse_rows((trained_run.workdir / "metrics.jsonl").read_text())
  fig = plots.run_figure(rows, 8 * 32, "w")
  loss_ax, lr_ax = [ax for ax in fig.axes if ax.get_lines()]
  assert [line.get_label() for line in loss_ax.get_lines()] == ["training", "validation"]
  assert list(loss_ax.get_lines()[1].get_xdata()) == [3, 6]
  assert [m["lr"] for m in rows if "lr" in m] == list(lr_ax.get_lines()[0].get_ydata())
  assert [ax.get_xlabel() for ax in loss_ax.child_axes] == ["tokens"]  # (the top axis)


@pytest.fixture(scope="module")
def two_runs(trained_run, tmp_path_factory):
  """The shared run, and a copy of it whose losses are 1 higher (as another run would be)."""
  other = tmp_path_factory.mktemp("other") / "higher"
  shutil.copytree(trained_run.workdir, other)
  rows = parse_rows((other / "metrics.jsonl").read_text())
  shifted = [{k: v + 1 if k in ("loss", "val_loss") else v for k, v in m.items()} for m in rows]
  (other / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in shifted))
  return trained_run.workdir, other


def test_plot_overlays_one_line_per_run(two_runs, tmp_path, capsys):
  a, b = two_runs
  assert cli.main(["plot", f"--workdir={a}", f"--workdir={b}", f"--output={tmp_path}/cmp.png"]) == 0
  assert capsys.readouterr().out == f"{tmp_path}/cmp.png: 2 runs, loss against tokens\n"
  assert _png_size(tmp_path / "cmp.png") == (800, 450)
  runs = [(w.name, parse_rows((w / "metrics.jsonl").read_text()), 10) for w in (a, b)]
  ax = plots.compare_figure(runs).axes[0]
  lines = ax.get_lines()
  assert [line.get_label() for line in lines] == [a.name, "higher"]
  assert list(lines[0].get_xdata()) == [10, 20, 30, 40, 50, 60]  # steps x tokens per step
  assert [y + 1 for y in lines[0].get_ydata()] == list(lines[1].get_ydata())
  assert [len(c.get_offsets()) for c in ax.collections] == [2, 2]  # each run's validation points


@pytest.mark.parametrize(("argv", "message"), [
    ([], "missing --workdir"),
    (["--workdir={A}"], "missing --output"),
    (["--workdir={A}", "--output=cmp.jpg"], "--output cmp.jpg does not end in .png"),
    (["--workdir={A}", "--output=/no/such/folder/cmp.png"], "the folder of --output, /no/such/folder, does not exist"),
    (["--workdir=/no/such/run", "--output={OUT}/cmp.png"], "workdir /no/such/run does not exist"),
    (["--workdir={EMPTY}", "--output={OUT}/cmp.png"], "has no config.json"),
    (["--workdir={FRESH}", "--output={OUT}/cmp.png"], "has no training losses in metrics.jsonl yet"),
    (["--workdir={A}", "--output={OUT}/cmp.png", "--x=time"], "--x"),
])
def test_bad_plot_flags_are_one_line(trained_run, tmp_path, capsys, argv, message):
  (tmp_path / "empty").mkdir()
  (tmp_path / "fresh").mkdir()  # (a run that has written its config but not a step yet)
  shutil.copy(trained_run.workdir / "config.json", tmp_path / "fresh" / "config.json")
  names = {"A": trained_run.workdir, "EMPTY": tmp_path / "empty", "FRESH": tmp_path / "fresh", "OUT": tmp_path}
  code = cli.main(["plot", *(a.format(**names) for a in argv)])
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("jaxlm: error: ")
  assert message in lines[0], lines[0]
