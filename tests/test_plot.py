"""llm_jax.plot on a real metrics.jsonl from a short training run: the PNG exists, panels and lines as expected."""

import json
import subprocess
import sys

import pytest

from llm_jax import plot
from llm_jax import train
import helpers
from helpers import REPO


def tiny_config(steps=10):
  return helpers.tiny_config(train=dict(steps=steps, warmup_steps=3, log_every=2), eval=dict(every=5),
                             checkpoint=dict(keep=1, async_save=False))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two real runs (different learning rates) on one CPU device: their workdirs. Two compiles each: ~15-60 s."""
  import jax
  root = tmp_path_factory.mktemp('runs')
  workdirs = []
  for name, lr in (('lr_1e-2', 1e-2), ('lr_3e-3', 3e-3)):
    config = tiny_config()
    config.train.learning_rate = lr
    workdir = str(root / name)
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    workdirs.append(workdir)
  return workdirs


@pytest.mark.slow
def test_metrics_file_has_train_and_eval_rows(runs):
  rows = plot.read_metrics(runs[0])
  steps, losses = plot.series(rows, 'loss')
  assert steps == [2, 4, 6, 8, 10]
  assert plot.series(rows, 'eval_loss')[0] == [5, 10]
  assert plot.series(rows, 'eval_perplexity')[0] == [5, 10]


@pytest.mark.slow
def test_figure_has_four_panels_and_one_line_per_run_and_metric(runs):
  fig = plot.plot_workdirs(runs)
  assert [ax.get_title() for ax in fig.axes] == ['Loss', 'Eval perplexity', 'Learning rate', 'Throughput']
  loss, ppl, lr, throughput = fig.axes
  assert len(loss.get_lines()) == 4  # train + eval per run
  assert len(ppl.get_lines()) == 2
  assert len(lr.get_lines()) == 2
  assert len(throughput.get_lines()) == 2
  assert [line.get_label() for line in lr.get_lines()] == ['lr_1e-2', 'lr_3e-3']
  assert [line.get_label() for line in loss.get_lines()] == ['lr_1e-2 train', 'lr_1e-2 eval',
                                                             'lr_3e-3 train', 'lr_3e-3 eval']
  train_line = loss.get_lines()[0]
  assert list(train_line.get_xdata()) == [2, 4, 6, 8, 10]
  rows = plot.read_metrics(runs[0])
  assert list(train_line.get_ydata()) == [r['loss'] for r in rows if 'loss' in r]


@pytest.mark.slow
def test_labels_override_basenames(runs):
  fig = plot.plot_workdirs(runs, labels=['a', 'b'])
  assert [line.get_label() for line in fig.axes[2].get_lines()] == ['a', 'b']
  with pytest.raises(ValueError, match='one per workdir'):
    plot.plot_workdirs(runs, labels=['a'])


@pytest.mark.slow
def test_command_writes_png(runs, tmp_path):
  out = tmp_path / 'sub' / 'curves.png'
  result = subprocess.run([sys.executable, '-m', 'llm_jax.plot', f'--workdir={runs[0]}', f'--workdir={runs[1]}',
                           '--label=fast', '--label=slow', f'--out={out}'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert [p.name for p in out.parent.iterdir()] == ['curves.png']  # no temp file left behind


def test_missing_metrics_is_one_clear_error(tmp_path):
  with pytest.raises(plot.MetricsError, match='metrics.jsonl: missing'):
    plot.read_metrics(str(tmp_path))
  result = subprocess.run([sys.executable, '-m', 'llm_jax.plot', f'--workdir={tmp_path}', f'--out={tmp_path}/x.png'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'metrics.jsonl: missing' in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'x.png').exists()


def test_truncated_last_line_is_skipped_and_a_bad_middle_line_named(tmp_path):
  rows = [dict(step=1, loss=2.0, learning_rate=1e-3, tokens_per_s=None), dict(step=2, eval_loss=1.5, eval_perplexity=4.5)]
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 3, "lo')
  assert plot.read_metrics(str(tmp_path)) == rows
  fig = plot.plot_workdirs([str(tmp_path)])
  assert len(fig.axes[3].get_lines()) == 0  # throughput null everywhere: no line, a 'no data' note
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(plot.MetricsError, match=r'metrics.jsonl:2: not JSON'):
    plot.read_metrics(str(tmp_path))
