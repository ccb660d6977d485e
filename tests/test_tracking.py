"""W&B tracking in offline mode (files written under $WANDB_DIR, nothing sent), and a run with tracking off that
never imports wandb (nor lm_eval)."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from llm_jax import train
from helpers import REPO, tiny_config

pytest.importorskip('wandb')


def _records(path):
  """The records of a W&B transaction log (run-<id>.wandb): a 7-byte ':W&B' header, then LevelDB-log style
  records (crc32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) in 32 KiB blocks."""
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B', data[:8]
  pos, block, pending, records = 7, 32768, b'', []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # the block's tail is padding
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      records.append(pending)
      pending = b''
  return records


def _history(run_dir):
  """The rows logged to an offline W&B run, and its config, read back from the run's transaction log."""
  from wandb.proto import wandb_internal_pb2
  (path,) = glob.glob(os.path.join(run_dir, 'run-*.wandb'))
  rows, config = [], {}
  for data in _records(path):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(data)
    kind = record.WhichOneof('record_type')
    if kind == 'history':
      rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    elif kind in ('run', 'config'):
      items = record.run.config.update if kind == 'run' else record.config.update
      config.update({item.key: json.loads(item.value_json) for item in items})
  return rows, config


def test_offline_wandb_run_holds_the_metrics_and_config(tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb_dir'))
  monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')  # were anything sent, it would fail: nothing listens
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  os.makedirs(tmp_path / 'wandb_dir')
  config = tiny_config(train=dict(steps=4, log_every=2),
                       tracking=dict(wandb_project='llm_jax_test', wandb_run_name='tiny', wandb_mode='offline'))
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir, jax.devices()[:1])
  (run_dir,) = glob.glob(str(tmp_path / 'wandb_dir' / 'wandb' / 'offline-run-*'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  logged, logged_config = _history(run_dir)
  by_step = {r['_step']: r for r in logged}
  for row in rows:  # every metrics.jsonl value is in the W&B history at its step
    for key, value in row.items():
      if key != 'step' and isinstance(value, float):
        assert by_step[row['step']][key] == pytest.approx(value), (key, row['step'])
  assert by_step[4]['eval_loss'] == pytest.approx(result['eval_loss'])
  assert open(os.path.join(workdir, 'wandb_run_id')).read().strip() in run_dir  # a resume continues this run
  assert logged_config['train']['steps'] == 4 and logged_config['tracking']['wandb_project'] == 'llm_jax_test'


def test_a_run_without_tracking_imports_neither_wandb_nor_lm_eval(tmp_path):
  code = f'''
import sys, jax
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
from helpers import tiny_config
import llm_jax.train
llm_jax.train.train_and_evaluate(tiny_config(train=dict(steps=2)), {str(tmp_path / "run")!r}, jax.devices()[:1])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("wandb", "lm_eval")))
'''
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
             JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip().splitlines()[-1] == '[]', run.stdout[-2000:]
