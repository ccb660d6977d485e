"""Compile-only dry run: memory and FLOPs for a mesh of 8 fake CPU devices, nothing allocated."""

import importlib.util
import io
import json
import math
import pathlib
import resource

import jax
import pytest

from llm_jax import dry_run
from llm_jax import train
from llm_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _preset(name, **overrides):
  spec = importlib.util.spec_from_file_location(f'preset_{name}', ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('__')
    config[section][field] = value
  return config


def _max_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def test_7b_parameter_count_by_eval_shape_without_allocating():
  rss_before = _max_rss_gb()
  shapes = train.abstract_params(_preset('7b'))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == 6_738_415_616
  assert _max_rss_gb() - rss_before < 1.0  # 27 GB of float32 weights were never materialised


def test_abstract_batch_matches_the_data():
  config = _preset('tiny', data__source='synthetic')
  trainer = train.Trainer(config, workdir='')
  real = synthetic.make_batch(config, 'train', 0)
  abstract = dry_run.abstract_batch(config, trainer.mesh)
  assert set(abstract) == set(real)
  for key, value in real.items():
    assert (abstract[key].shape, abstract[key].dtype) == (value.shape, value.dtype), key


def test_tiny_dry_run_on_fsdp_mesh_reports_memory():
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 fake CPU devices'
  config = _preset('tiny', mesh__data=1, mesh__fsdp=8)
  out = io.StringIO()
  r = dry_run.report(config, stream=out)
  text = out.getvalue()
  assert json.loads(text.strip().splitlines()[-1])['params'] == r['params']
  for word in ('arguments', 'outputs', 'temporaries', 'generated code', 'total', 'peak estimate', 'FLOPs'):
    assert word in text
  assert r['num_devices'] == 8 and r['mesh'] == {'data': 1, 'expert': 1, 'fsdp': 8, 'context': 1, 'tensor': 1}
  assert r['params'] == 918_144
  mem = r['memory_per_device_bytes']
  assert mem['arguments'] > 0 and mem['temporaries'] > 0
  assert mem['total'] == mem['arguments'] + mem['outputs'] - mem['alias'] + mem['temporaries'] + \
      mem['generated_code']
  # The state is donated: its buffers alias the outputs.
  assert mem['alias'] > 0.9 * mem['outputs']
  # Arguments hold this device's shard of params + Adam moments (+ the batch), i.e. about 3/8 of the state.
  state_bytes = 3 * r['params'] * 4
  assert state_bytes / 8 <= mem['arguments'] < state_bytes / 8 * 1.2
  assert r['xla_flops_per_device'] > 0 and r['model_flops_per_device'] > 0


def test_dry_run_error_names_the_field():
  config = _preset('tiny', mesh__data=1, mesh__fsdp=8, data__global_batch_size=4)
  with pytest.raises(SystemExit, match='config.data.global_batch_size'):
    dry_run.report(config, stream=io.StringIO())


def test_7b_dry_run_on_8_device_fsdp_mesh():
  # 7B compiles for CPU in a few seconds and well under 2 GB of host memory: only shapes exist.
  config = _preset('7b', mesh__data=1, mesh__fsdp=8, data__global_batch_size=8)
  r = dry_run.analyze(config)
  assert r['params'] == 6_738_415_616
  gb = r['memory_per_device_gb']
  # float32 params + two float32 moments, sharded 8 ways: 3 * 6.74e9 * 4 B / 8 = 9.41 GiB per device.
  assert 9.3 < gb['arguments'] < 9.6
  assert gb['temporaries'] > 0 and gb['peak_estimate'] >= gb['arguments']
  assert _max_rss_gb() < 4.0


def test_main_dry_run_cli():
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'llm_jax.main', '--config=experiments/tiny.py',
                         '--config.mesh.data=1', '--config.mesh.fsdp=8', '--dry_run'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'temporaries' in proc.stdout
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['num_devices'] == 8 and r['memory_per_device_bytes']['total'] > 0
