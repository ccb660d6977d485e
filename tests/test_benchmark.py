"""The benchmark CLI runs on CPU with the tiny config and reports sane fields."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from llm_jax import benchmark
from llm_jax import metrics
from llm_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = ('tokens_per_s', 'mfu', 'step_time_s', 'peak_memory_gb', 'params', 'flops_per_token', 'device_kind',
          'num_devices', 'config')


def _tiny():
  import importlib.util
  spec = importlib.util.spec_from_file_location('tiny_preset', ROOT / 'experiments' / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _check(result, config, steps):
  for field in FIELDS:
    assert field in result, field
  assert result['tokens_per_s'] > 0
  assert result['mfu'] is None  # CPUs have no known peak: null, not a made-up number
  times = result['step_time_s']
  assert 0 < times['min'] <= times['median'] <= times['max'] and times['mean'] > 0
  assert math.isclose(result['tokens_per_s'], result['tokens_per_step'] / times['mean'], rel_tol=1e-6)
  assert result['tokens_per_step'] == config.data.global_batch_size * config.data.seq_len
  assert result['peak_memory_gb'] is None  # the CPU backend keeps no memory statistics
  eval_shape_count = sum(math.prod(x.shape) for x in jax.tree.leaves(train.abstract_params(config)))
  assert result['params'] == eval_shape_count == metrics.total_params(config.model)
  assert result['flops_per_token'] == metrics.flops_per_token(config.model, config.data.seq_len)
  assert result['steps'] == steps
  assert math.isfinite(result['final_loss'])
  assert result['config']['d_model'] == config.model.d_model


def test_cli_on_cpu_with_tiny_config(tmp_path):
  # One CPU device: compiling for 8 fake ones would only slow the test (meshes are covered below).
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'llm_jax.benchmark', '--config=experiments/tiny.py',
                         '--steps=3', '--warmup=1', f'--workdir={tmp_path}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  _check(result, _tiny(), steps=3)
  assert result['device_kind'] == 'cpu' and result['num_devices'] == 1
  assert result['input'] == 'pregenerated'
  assert json.loads((tmp_path / 'benchmark.jsonl').read_text().splitlines()[-1]) == result


@pytest.mark.parametrize('input_mode,donate,one_document', [('prefetch', True, False), ('inline', False, True)])
def test_input_modes_and_donation(input_mode, donate, one_document):
  config = _tiny()
  config.model.num_layers = 1
  config.data.seq_len = 32
  config.data.global_batch_size = 4
  result = benchmark.run(config, steps=2, warmup=1, input_mode=input_mode, donate=donate,
                         devices=jax.devices()[:2], one_document=one_document)
  _check(result, config, steps=2)
  assert result['num_devices'] == 2 and result['input'] == input_mode and result['donate'] == donate
  assert result['one_document'] == one_document


def test_cli_rejects_bad_steps():
  proc = subprocess.run([sys.executable, '-m', 'llm_jax.benchmark', '--config=experiments/tiny.py', '--steps=0'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and '--steps' in proc.stderr
