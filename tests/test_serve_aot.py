"""The serving engine's steps compiled for a TPU target (llm_jax/serving/aot.py, `python -m llm_jax.serve_dry_run`):
jax's ragged paged attention kernel lowers for our pool layout and rows, inside shard_map over a tensor mesh."""

import math
import subprocess
import sys

import pytest

from helpers import REPO, tiny_config
from llm_jax.serving import aot


def _config():
  # head_dim 128 (what the TPU kernel takes), GQA 8 query / 4 kv heads over a 4-way tensor mesh
  return tiny_config(model=dict(d_model=1024, num_heads=8, num_kv_heads=4, ffn_dim=128, vocab_size=128,
                                max_seq_len=64), mesh=dict(data=1, fsdp=1, tensor=-1))


def test_engine_steps_compile_for_v5e_with_the_ragged_kernel():
  r = aot.analyze(_config(), target='v5e-4', rows=4, prefill=32, page_size=16, max_model_len=64)
  assert (r['platform'], r['num_devices'], r['mesh']['tensor'], r['kernel']) == ('tpu', 4, 4, 'ragged')
  assert r['steps']['decode']['attention_kernels'] == ['ragged_paged']
  assert r['steps']['prefill']['attention_kernels'] == ['ragged_paged']
  assert (r['steps']['decode']['rows'], r['steps']['decode']['tokens']) == (4, 1)
  # one page per device: 2 layers x 16 tokens x (2 x 4 kv heads / 4 devices) x 128 x float32
  assert r['page_bytes_per_device'] == 2 * 16 * 2 * 128 * 4
  assert r['num_pages_compiled'] == 4 * 4 + 1  # 4 rows of 64 tokens in pages of 16, and the null page
  other = max(s['memory_per_device_bytes']['peak'] for s in r['steps'].values()) - r['pool_gb_per_device'] * 2 ** 30
  assert r['pages_fit'] == math.floor((r['usable_memory_gb'] * 2 ** 30 - other) / r['page_bytes_per_device'])
  assert r['fits'] is True


def test_the_job_refuses_ragged_where_it_cannot_run():
  run = subprocess.run([sys.executable, '-m', 'llm_jax.serve_dry_run', f'--config={REPO}/experiments/tiny.py',
                        '--attention=ragged', '--config.data.source=synthetic'], capture_output=True, text=True,
                       cwd=REPO)
  assert run.returncode == 1, run.stderr[-2000:]
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'engine.attention' in lines[0], run.stderr[-2000:]


def test_ragged_needs_heads_that_split_alike_over_the_mesh():
  import dataclasses
  from llm_jax import sharding, targets
  from llm_jax.model import TransformerConfig
  from llm_jax.serving.engine import RequestError, paged_kernel
  config = _config()
  mesh = sharding.make_mesh(config, targets.get('v5e-4').devices())  # tensor 4
  rules = sharding.rules_of(config)
  model = TransformerConfig.from_config(config)
  assert paged_kernel('auto', model, 'tpu', mesh, rules) == 'ragged'
  two_kv_heads = dataclasses.replace(model, num_kv_heads=2)
  assert paged_kernel('auto', two_kv_heads, 'tpu', mesh, rules) == 'xla'
  with pytest.raises(RequestError, match='engine.attention: ragged needs the 8 query and 2 kv heads'):
    paged_kernel('ragged', two_kv_heads, 'tpu', mesh, rules)
