"""Loss curves as pictures: one run's WORKDIR/loss.png (training and validation loss against steps, with
tokens on the top axis and the learning rate on a second y axis), refreshed at each evaluation; and
several runs overlaid for `jaxlm plot`. Pure drawing on matplotlib's object API (no pyplot, no global
backend state, so it is safe beside training); the callers read metrics.jsonl and write the bytes."""

import io

from jaxlm import files


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of a metrics.jsonl key, skipping the lines without it (or with null)."""
  points = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
  return [s for s, _ in points], [v for _, v in points]


def draw_losses(ax, rows: list[dict], label: str = "", color=None) -> None:
  """Training loss as a line and validation loss as points ("training", "validation" without a label)."""
  steps, loss = series(rows, "loss")
  if steps:
    ax.plot(steps, loss, "-", color=color, label=f"{label} training" if label else "training")
    color = ax.get_lines()[-1].get_color()
  steps, val = series(rows, "val_loss")
  if steps:
    ax.plot(steps, val, "o", color=color, label=f"{label} validation" if label else "validation")


def run_figure(rows: list[dict], tokens_per_step: int, title: str):
  """One run: losses against steps (tokens on the top axis), the learning rate on the right."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import FuncFormatter

  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.add_subplot()
  draw_losses(ax, rows)
  ax.set(xlabel="step", ylabel="loss (nats per token)", title=title)
  _tokens_axis(ax, tokens_per_step)
  steps, lr = series(rows, "lr")
  if steps:
    right = ax.twinx()
    right.plot(steps, lr, ":", color="gray", label="learning rate")
    right.set_ylabel("learning rate")
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 0.00175 (no offset text)
  handles = ax.get_legend_handles_labels()[0] + (right.get_legend_handles_labels()[0] if steps else [])
  ax.legend(handles=handles, loc="upper right")
  return fig


def compare_figure(runs: list[tuple[str, list[dict], int]], x: str = "tokens"):
  """Several runs, (name, metrics rows, tokens per step) each: one training line per run, its
  validation losses as points of the same colour, against tokens (runs of other batches compare) or step."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8, 4.5), layout="constrained")
  ax = fig.add_subplot()
  for name, rows, tokens_per_step in runs:
    scale = tokens_per_step if x == "tokens" else 1
    scaled = [{**m, "step": m["step"] * scale} for m in rows]
    steps, loss = series(scaled, "loss")
    line = ax.plot(steps, loss, "-", label=name, linewidth=1.2)[0]
    steps, val = series(scaled, "val_loss")
    ax.scatter(steps, val, color=line.get_color(), s=18, zorder=3)
  ax.set(xlabel="tokens" if x == "tokens" else "step", ylabel="loss (nats per token)",
         title="training loss (lines) and validation loss (points)")
  ax.legend()
  return fig


def _tokens_axis(ax, tokens_per_step: int) -> None:
  from matplotlib.ticker import EngFormatter

  if tokens_per_step > 0:
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
    top.set_xlabel("tokens")
    top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.5M, not 1.5 under a "1e6" in the corner


def write_png(fig, path: str) -> None:
  """The figure as a PNG at `path` (local or gs://), written whole."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  files.write_bytes(path, buffer.getvalue())
