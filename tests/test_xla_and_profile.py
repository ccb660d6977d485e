"""config.xla options reach the compiled step; config.train.profile_steps writes a profiler trace."""

import glob
import os

import jax
import pytest

from llm_jax import benchmark
from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import profiling
from llm_jax import train
from llm_jax import xla_options
from llm_jax.data import synthetic
import helpers


tiny_config = helpers.tiny_config_with(model=dict(num_layers=1), data=dict(global_batch_size=4),
                                       train=dict(steps=4, warmup_steps=1, log_every=2), eval=dict(steps=1))


def test_parse_options_takes_xla_flags_syntax_and_names_the_field():
  assert xla_options.parse_options('--xla_gpu_enable_latency_hiding_scheduler=true xla_gpu_enable_triton_gemm=0 '
                                   '--xla_gpu_enable_command_buffer=FUSION,CUBLAS --xla_x=') == {
      'xla_gpu_enable_latency_hiding_scheduler': True, 'xla_gpu_enable_triton_gemm': False,
      'xla_gpu_enable_command_buffer': 'FUSION,CUBLAS', 'xla_x': ''}
  with pytest.raises(config_lib.ConfigError, match='config.xla.options'):
    validation.validate(tiny_config(xla=dict(options='latency_hiding')), 1)
  with pytest.raises(config_lib.ConfigError, match='config.train.profile_steps'):
    validation.validate(tiny_config(train=dict(profile_steps='8,5')), 1)
  with pytest.raises(config_lib.ConfigError, match='step 1 compiles'):
    profiling.parse_steps('1,2')
  assert profiling.parse_steps('5,8') == (5, 8) and profiling.parse_steps('3') == (3, 3)


def test_config_xla_options_reach_the_compiled_train_step(tmp_path):
  """An option with a visible effect on a CPU (an HLO dump) set in config.xla.options, beside GPU options that a
  CPU compile accepts and ignores: the Trainer's step compiles with them."""
  dump = tmp_path / 'dump'
  config = tiny_config(xla=dict(options=f'--xla_dump_to={dump} --xla_dump_hlo_as_text=true '
                                        '--xla_gpu_enable_latency_hiding_scheduler=true'))
  trainer = train.Trainer(config, str(tmp_path), jax.devices()[:1])
  state = trainer.fresh_state()
  trainer.train_step(state, trainer.put(synthetic.make_batch(config, 'train', 0)))
  dumped = [os.path.basename(p) for p in glob.glob(str(dump / '*'))]
  assert any('jit_step' in name for name in dumped), dumped[:10]


def _trace_files(directory):
  return glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.xplane.pb')), \
      glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.trace.json.gz'))


def test_profile_steps_write_a_trace_in_training_and_the_benchmark(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(train=dict(profile_steps='2,3')), str(workdir), jax.devices()[:1])
  xplane, perfetto = _trace_files(str(workdir / 'profile'))
  assert xplane and perfetto, os.listdir(workdir)
  profile_dir = str(tmp_path / 'bench' / 'profile')
  benchmark.run(tiny_config(train=dict(profile_steps='2,2')), steps=2, warmup=1, devices=jax.devices()[:1],
                profile_dir=profile_dir)
  assert all(_trace_files(profile_dir))
