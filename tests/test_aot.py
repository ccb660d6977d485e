"""Ahead-of-time compiles for hardware this machine lacks (`--dry_run --target`, llm_jax/targets.py).

libtpu and the CUDA plugin (the 'aot' extra, part of the test extras) build compile-only TPU and NVIDIA devices;
the real train step compiles for them and the report reads the compiled HLO.
"""

import importlib.util
import io
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from llm_jax import config as config_lib
from llm_jax import dry_run
from llm_jax import hlo_analysis
from llm_jax import targets
from llm_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _preset(name, **overrides):
  """experiments/<name>.py on the synthetic source, with section__field=value overrides."""
  config = config_lib.load_experiment(name)
  config.data.source = 'synthetic'
  for dotted, value in overrides.items():
    section, field = dotted.split('__')
    config[section][field] = value
  return config


def _report(config, target):
  out = io.StringIO()
  result = dry_run.report(config, stream=out, target=target)
  last = json.loads(out.getvalue().strip().splitlines()[-1])
  for key in ('target', 'fits', 'memory_per_device_gb', 'attention_kernels'):
    assert key in last, key
  return result, out.getvalue()


def test_target_names():
  assert targets.get('v5p-8').topology == 'v5p:2x2x1' and targets.get('v5p-8').num_devices == 4
  assert targets.get('v4-16').topology == 'v4:2x2x2'
  assert targets.get('v5p-64').topology == 'v5p:2x4x4' and targets.get('v5p-64').num_devices == 32
  assert targets.get('v5e-8').topology == 'v5e:2x4' and targets.get('v5e-8').num_devices == 8
  assert targets.get('v6e-256').topology == 'v6e:16x16'
  h200 = targets.get('H200x8')
  assert (h200.platform, h200.num_devices, round(h200.memory_gib, 1), h200.usable_fraction) == ('gpu', 8, 140.4, 0.75)


@pytest.mark.parametrize('name', ['v5p-7', 'v5e-3', 'h100x4', 'tpu-v5p'])
def test_a_name_that_is_not_a_target_lists_the_valid_ones(name):
  with pytest.raises(SystemExit) as e:
    dry_run.report(_preset('tiny'), stream=io.StringIO(), target=name)
  message = str(e.value)
  assert message.startswith('error: --target=') and '\n' not in message
  assert 'v5p-N' in message or 'e.g.' in message


def test_a_missing_plugin_names_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name in ('libtpu', 'jax_plugins.xla_cuda12') else real(name, *a))
  targets._devices.cache_clear()
  try:
    for name, extra in (('v5e-8', 'jax[tpu]'), ('h100', 'jax[cuda12]')):
      with pytest.raises(SystemExit) as e:
        dry_run.report(_preset('tiny'), stream=io.StringIO(), target=name)
      assert str(e.value).startswith('error: ') and extra in str(e.value) and '\n' not in str(e.value)
  finally:
    targets._devices.cache_clear()


def test_cli_typo_is_one_line():
  run = subprocess.run([sys.executable, '-m', 'llm_jax.main', f'--config={ROOT}/experiments/tiny.py', '--dry_run',
                        '--target=v5p-9'], capture_output=True, text=True, cwd=ROOT)
  assert run.returncode == 1
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'v5p' in lines[0], run.stderr[-2000:]


def test_tiny_with_splash_compiles_for_v5e_8():
  """The failure this fixes: a Mosaic kernel under automatic partitioning ('wrap the call in a shard_map')."""
  result, text = _report(_preset('tiny', model__attention='splash'), 'v5e-8')
  assert result['target'] == 'v5e-8' and result['platform'] == 'tpu' and result['num_devices'] == 8
  assert 0 < result['active_matmul_params'] < result['params']  # dense: matmul weights, less norms (embedding)
  assert result['attention_kernels'] == ['splash']
  assert result['fits'] is True and 'fits v5e-8: yes' in text
  # Attention runs inside the kernel, so the compiled matmuls are exactly the model's 6N per token (no remat).
  assert result['compiled_matmul_flops_per_device'] == pytest.approx(result['model_matmul_flops_per_device'],
                                                                     rel=1e-3)


def test_a_step_the_compiler_refuses_is_reported_as_not_fitting():
  """libtpu refuses a step over its HBM (RESOURCE_EXHAUSTED): the report says fits no, with its figures."""
  config = _preset('tiny', model__vocab_size=32000, model__max_seq_len=2048, data__seq_len=2048,
                   data__global_batch_size=512)
  result, text = _report(config, 'v5e-8')
  assert result['fits'] is False and 'fits v5e-8: no' in text
  assert result['memory_per_device_gb']['required'] > result['memory_per_device_gb']['available'] == 15.75


@pytest.mark.slow
def test_narrow_7b_two_layers_pick_splash_on_v5e_8_with_auto():
  """The 7b preset with two layers, narrowed to d_model 512 (head_dim stays 128, which splash takes): the same
  graph as the full width in a quarter of the compile time."""
  config = _preset('7b', model__num_layers=2, model__d_model=512, model__ffn_dim=1024, model__num_heads=4,
                   model__num_kv_heads=4, model__vocab_size=4096, model__attention='auto', data__seq_len=512,
                   data__global_batch_size=8, mesh__data=1, mesh__fsdp=-1, model__remat='full')
  result, _ = _report(config, 'v5e-8')
  assert result['config']['attention'] == 'auto' and result['attention_kernels'] == ['splash']
  assert {axis: size for axis, size in result['mesh'].items() if size > 1} == {'fsdp': 8}
  assert result['collectives']['all-gather']['count'] >= 2 * 7  # FSDP gathers each layer's 7 weight matrices
  # Full remat recomputes the blocks' forward: between 1 and 4/3 of the model's matmuls (the head is not redone).
  assert 1.1 < result['compiled_matmul_flops_per_device'] / result['model_matmul_flops_per_device'] < 1.34


def test_fsdp_gathers_each_layer_weight_once_in_the_forward_and_once_in_the_backward():
  """Full remat under FSDP: the backward's recompute of a projection and its transpose read one gathered weight.
  TPU's partitioner leaves merging their two gathers to a CSE pass with a distance limit, which q and k (RoPE in
  float32 between projection and attention) exceeded before partitioning.gather_for_matmul: 2 x 512 KiB more per
  layer here (a narrow 7b: the graph, not the widths, decides; 5 s to compile)."""
  layers = 2
  config = _preset('7b', model__num_layers=layers, model__d_model=512, model__ffn_dim=1024, model__num_heads=4,
                   model__num_kv_heads=4, model__vocab_size=4096, model__max_seq_len=256, data__seq_len=256,
                   data__global_batch_size=4, mesh__data=1, mesh__fsdp=-1, model__remat='full')
  result = dry_run.analyze(config, target='v5p-8')
  d, ffn, vocab = config.model.d_model, config.model.ffn_dim, config.model.vocab_size
  layer_weights = 2 * (4 * d * d + 3 * d * ffn)  # bfloat16 q, k, v, o, gate, up, down
  head = 2 * d * vocab  # gathered once (its gradient is reduce-scattered, not gathered)
  extra = result['collectives']['all-gather']['bytes'] - (2 * layers * layer_weights + head)
  assert 0 <= extra <= 8 * d, extra  # the norms' scales at most


@pytest.mark.parametrize('target', ['h100', 'h100x8'])
def test_cudnn_on_h100_one_document_branch_has_no_bias(target):
  from jax._src.cudnn import fused_attention_stablehlo as fa
  checks = fa.check_compute_capability
  result, _ = _report(_preset('tiny', model__dtype='bfloat16'), target)
  assert result['platform'] == 'gpu' and result['device_kind'] == 'NVIDIA H100 80GB HBM3'
  # The per-batch switch: one document a row (no bias, no lengths), the packed layout (Hopper: the target's
  # compute capability reached jax's checks), and the dense mask as the fallback.
  assert {'cudnn', 'cudnn_packed', 'cudnn_bias'} <= set(result['attention_kernels'])
  assert fa.check_compute_capability is checks  # the checks answer for the host again after the compile
  assert result['compiled_matmul_flops_per_device'] == pytest.approx(result['model_matmul_flops_per_device'],
                                                                     rel=1e-3)


def test_matmul_count_is_the_same_scanned_or_unrolled_and_agrees_with_xla():
  """The HLO walk multiplies loop bodies by their trip counts: scanned layers count as many FLOPs as unrolled
  ones, where XLA's cost analysis counts the loop body once; unrolled, the two agree (XLA also counts the
  elementwise work, a few percent)."""
  counts = {}
  for scan in (True, False):
    config = _preset('tiny', model__scan_layers=scan, model__remat='full', mesh__data=1, mesh__fsdp=8)
    trainer = train.Trainer(config, workdir='')
    compiled = trainer.train_step.lower(trainer.abstract_state(), dry_run.abstract_batch(config, trainer.mesh)
                                        ).compile()
    counts[scan] = (hlo_analysis.analyze(compiled)['matmul_flops'], compiled.cost_analysis()['flops'])
  assert counts[True][0] == counts[False][0]
  assert counts[True][1] < 0.8 * counts[True][0]  # XLA's figure misses a scanned layer
  assert 0.95 < counts[False][0] / counts[False][1] <= 1.0
  assert jax.device_count() == 8


def test_tpu_ragged_dot_kernels_count_as_their_padded_matmuls():
  """TPU runs jax.lax.ragged_dot as a Mosaic grouped-matmul kernel (a custom call, not a dot): the HLO walk counts
  it at the compiler's estimate, 2 * rows * contracted * columns of the whole operand (an upper bound: the kernel
  skips tiles past the groups' rows)."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  one = NamedSharding(Mesh(np.array(targets.get('v5p-8').devices()[:1]), ('x',)), PartitionSpec())
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=one)
          for shape, dtype in (((1024, 256), jnp.bfloat16), ((4, 256, 512), jnp.bfloat16), ((4,), jnp.int32))]
  compiled = jax.jit(jax.lax.ragged_dot).lower(*args).compile()
  assert hlo_analysis.analyze(compiled)['matmul_flops'] == 2 * 1024 * 256 * 512
