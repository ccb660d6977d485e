"""Curves of one or more runs from their metrics.jsonl: `python -m llm_jax.plot --workdir=DIR [--workdir=DIR2] --out=F.png`.

Four panels, every run overlaid and labelled (the workdir's basename, or --label):

  loss          train loss (solid) and eval loss (dashed markers) against the step
  perplexity    eval perplexity against the step
  learning rate the schedule as logged
  throughput    tokens/s (the first logged interval includes no compile time; see train.py)

`figure(runs)` / `plot_workdirs(dirs)` return the matplotlib Figure (tests and the notebook use them);
`save_atomic` writes it through a temp file and a rename.
"""

from __future__ import annotations

import json
from typing import Any, Sequence
from llm_jax import storage
from llm_jax.errors import UserError
from llm_jax import cli

PANELS = (  # (title, y label, [(metric key, line style suffix), ...])
    ('Loss', 'loss', (('loss', 'train'), ('eval_loss', 'eval'))),
    ('Eval perplexity', 'perplexity', (('eval_perplexity', 'eval'),)),
    ('Learning rate', 'learning rate', (('learning_rate', ''),)),
    ('Throughput', 'tokens / s', (('tokens_per_s', ''),)),
)


class MetricsError(UserError, ValueError):
  """A workdir has no (readable) metrics.jsonl; the message names the file."""


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of <workdir>/metrics.jsonl; a truncated last line (a run still writing) is skipped."""
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.isdir(workdir):
    raise MetricsError(f'{workdir}: no such workdir')
  if not storage.exists(path):
    raise MetricsError(f'{path}: missing; has a run written to {workdir}? '
                       '(python -m llm_jax.main --config=... --workdir=DIR writes it; see docs/pretrain.md)')
  rows = []
  lines = storage.read_text(path).splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # a run may be appending right now
        continue
      raise MetricsError(f'{path}:{number}: not JSON ({e.msg})') from None
  if not rows:
    raise MetricsError(f'{path}: empty; the run has not logged a step yet (config.train.log_every)')
  return rows


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that carry a finite number under `key`, in step order (last row wins a step)."""
  points = {}
  for row in rows:
    value = row.get(key)
    if isinstance(value, (int, float)) and value == value and 'step' in row:
      points[int(row['step'])] = float(value)
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def figure(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]):
  """A Figure with one panel per PANELS entry and one line per (run, metric) that has data.

  `runs` is [(label, rows), ...]. Uses the Agg backend's Figure directly (no pyplot state), so it works headless
  and inside notebooks (display(fig)).
  """
  from matplotlib.figure import Figure
  fig = Figure(figsize=(12, 8), layout='constrained')
  axes = fig.subplots(2, 2).ravel()
  colors = [f'C{i % 10}' for i in range(len(runs))]
  for ax, (title, ylabel, keys) in zip(axes, PANELS):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    for color, (label, rows) in zip(colors, runs):
      for key, kind in keys:
        steps, values = series(rows, key)
        if not steps:
          continue
        name = f'{label} {kind}'.strip() if len(keys) > 1 else label
        if kind == 'eval':
          ax.plot(steps, values, color=color, linestyle='--', marker='o', markersize=4, label=name)
        else:
          ax.plot(steps, values, color=color, label=name)
    if keys[0][0] == 'learning_rate':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    if ax.get_lines():
      ax.legend(fontsize='small')
    else:
      ax.text(0.5, 0.5, 'no data', ha='center', va='center', transform=ax.transAxes, color='gray')
  return fig


def save_atomic(fig, out: str, dpi: int = 100) -> None:
  """Renders the figure in memory, then writes it atomically (storage.write_bytes: a temporary name and a rename
  locally, with the mode a plain open() gives; one PUT on a bucket), so readers never see half an image."""
  import io
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  name = storage.basename(out)
  fmt = name.rsplit('.', 1)[-1] if '.' in name else 'png'
  buffer = io.BytesIO()
  FigureCanvasAgg(fig)
  fig.savefig(buffer, format=fmt, dpi=dpi)
  storage.write_bytes(out, buffer.getvalue())


def plot_workdirs(workdirs: Sequence[str], labels: Sequence[str] = ()):
  """The Figure of the given workdirs; labels default to each workdir's basename."""
  if labels and len(labels) != len(workdirs):
    raise MetricsError(f'{len(labels)} --label values for {len(workdirs)} --workdir values; give one per workdir or none')
  labels = list(labels) or [storage.basename(storage.absolute(w)) or w for w in workdirs]
  return figure([(label, read_metrics(w)) for label, w in zip(labels, workdirs)])


def _main() -> None:
  """Flags are defined only when run as a program, so importing this module (the notebook, tests) defines none."""
  from absl import app, flags

  workdirs = flags.DEFINE_multi_string('workdir', None, 'Run directory holding metrics.jsonl; repeat to overlay runs.')
  labels = flags.DEFINE_multi_string('label', None, 'Legend label per --workdir, in order (default: its basename).')
  out = flags.DEFINE_string('out', 'metrics.png', 'Output image (.png, .svg or .pdf), written atomically.')
  dpi = flags.DEFINE_integer('dpi', 100, 'Resolution of raster output in dots per inch.')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdirs.value:
      raise app.UsageError('--workdir is required (repeat it to overlay several runs)')
    fig = plot_workdirs(workdirs.value, labels.value or ())
    save_atomic(fig, out.value, dpi.value)
    print(f'wrote {out.value}')

  cli.run(main)


if __name__ == '__main__':
  _main()
